"""Your own task at a sensible cost: a folder task without a recipe takes defaults sized to its images (and says
so), a recipe's BatchNorm term is dropped for a teacher without BatchNorm (set explicitly, it is refused naming that
teacher), and the project's LeNet-5 takes 28 and 32 px images (other sizes are refused in one line)."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from base.errors import ConfigError
from conftest import tiny_values
from trainable.akd import AKDRun
from trainable.config import build_config
from trainable.images import folder_task
from trainable.models import build_classifier
from trainable.tasklist import TASKS
from trainable.tasks import EvalData


def _folder(root, side, mode, recipe=None, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            shape = (side, side) if mode == "L" else (side, side, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    if recipe:
        (root / "task.yaml").write_text(yaml.safe_dump({"recipe": recipe}))
    return f"folder:{root}"


class NoBatchNorm(nn.Module):
    """A user's LeNet-like teacher: convolutions and linear layers, no BatchNorm."""

    def __init__(self, num_classes=2, channels=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("side, mode, recipe, epochs", [
    (32, "L", "MNIST-sized digits", 30), (31, "L", "digits", 30), (8, "RGB", "digits", 30), (32, "RGB", "cifar100", 500),
    (96, "RGB", "folder", 200)])
def test_a_folder_without_a_recipe_takes_one_sized_to_its_images_and_says_which(tmp_path, side, mode, recipe, epochs):
    task = folder_task(_folder(tmp_path / "imgs", side, mode)[len("folder:"):])
    assert task.defaults["epochs"] == epochs
    said = [n for n in task.notes if "names no recipe" in n]
    assert len(said) == 1 and f"take the {recipe} recipe ({epochs} epochs" in said[0] and f"{side} px" in said[0]
    # MNIST's sizes: a LeNet-5 student without BatchNorm, KL for both players, a clipped gradient, w_bn 1
    mnist_sized = [task.defaults.get(k) for k in ("student", "student_loss", "w_bn")] == ["lenet5", "kl", 1.0]
    assert mnist_sized == recipe.startswith("MNIST")


@pytest.mark.parametrize("recipe", sorted(TASKS))
def test_every_shipped_recipe_runs_with_a_teacher_without_batchnorm(tmp_path, recipe):
    """The recipe's BatchNorm-statistics term (digits': w_bn 0.1) is dropped with a note; nothing is refused."""
    task = _folder(tmp_path / "imgs", 16, "L", recipe=recipe)
    x = torch.randn(4, 1, 16, 16)
    data = EvalData(x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([0, 1, 0, 1]))
    values = {**tiny_values(task=task), "teacher": "cnn", "student": "cnn", "student_fraction": None, "method": "dfad"}
    cfg = build_config(values)
    assert cfg.w_bn == TASKS[recipe].defaults.get("w_bn", 0.0)
    run = AKDRun(cfg, NoBatchNorm(), data, torch.device("cpu"))
    assert run.cfg.w_bn == 0.0
    assert any("is dropped: the teacher cnn has no BatchNorm layers" in n for n in run.notes) == (cfg.w_bn > 0)
    run.iteration()
    with pytest.raises(ConfigError, match="w_bn: .*the teacher cnn has no BatchNorm layers.*set w_bn=0"):
        AKDRun(build_config({**values, "w_bn": 0.5}), NoBatchNorm(), data, torch.device("cpu"))


@pytest.mark.parametrize("side", [28, 32])
def test_lenet5_takes_28_and_32_px_images(side):
    model = build_classifier("lenet5", 10, 1, side)
    assert model(torch.zeros(2, 1, side, side)).shape == (2, 10)


def test_lenet5_at_a_size_it_cannot_take_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="student: lenet5 takes images of an even side from 16 to 32 px .* not 8 px"):
        build_config({"task": "digits", "student": "lenet5"})


def test_a_student_of_your_own_with_a_width_argument_is_sized_like_the_built_in_families(tmp_path, monkeypatch):
    (tmp_path / "sizednets.py").write_text(
        "import torch.nn as nn\n\n\n"
        "def Net(num_classes=10, width_mult=1.0):\n"
        "    c = max(1, int(round(128 * width_mult)))\n"
        "    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(c, num_classes))\n\n\n"
        "def Fixed(num_classes=10):\n"
        "    return Net(num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from trainable.models import count_params, is_widthable, width_for_fraction

    assert is_widthable("sizednets:Net") and not is_widthable("sizednets:Fixed")
    teacher = build_classifier("cnn", 10, 1, 8)
    w = width_for_fraction("sizednets:Net", 0.05, count_params(teacher), 10, 1, 8)
    sized = count_params(build_classifier("sizednets:Net", 10, 1, 8, w))
    assert w < 1.0 and abs(sized / count_params(teacher) - 0.05) < 0.02  # the width grid steps by 0.05
    cfg = build_config({**tiny_values(), "student": "sizednets:Net", "student_fraction": 0.05})
    assert cfg.student_fraction == 0.05  # kept: it has a width knob
    assert build_config({**tiny_values(), "student": "sizednets:Fixed"}).student_fraction is None
    with pytest.raises(ConfigError, match="takes width_mult="):
        build_config({**tiny_values(), "student": "sizednets:Fixed", "student_fraction": 0.05})
