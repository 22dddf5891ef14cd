"""Teachers and students by name or import path: torchvision, timm, the user's factory, an exported program."""
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

from base.errors import ConfigError, UserError
from conftest import run_main, tiny_values
from trainable.akd import AKDRun
from trainable.config import build_config
from trainable.models import build_classifier, classifier_params, feature_layers, width_for_fraction
from trainable.sources import ModelSourceError, as_spec, check_forward, check_spec, check_student, load_program
from trainable.tasks import get_task
from trainable.teacher import load_teacher, prepare_teacher

CIFAR10 = get_task("cifar10")  # 10 classes, 3 x 32 x 32


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, in the folder they run from, with a good factory and a few bad ones."""
    (tmp_path / "usernets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                              nn.AdaptiveAvgPool2d(1))
                self.fc = nn.Linear(16, num_classes)

            def forward(self, x):
                return self.fc(self.features(x).flatten(1))

        def not_a_module(num_classes):
            return "a string"

        def raises(num_classes):
            raise RuntimeError("weights server unreachable")

        def wrong_classes(num_classes):
            return Net(num_classes + 1)

        class Aux(Net):  # GoogLeNet-like: main and aux logits in train mode
            def forward(self, x):
                out = super().forward(x)
                return (out, out) if self.training else out

        class Flaky(Net):  # passes the door check, then fails inside the distillation step once FAIL is set
            FAIL = False

            def forward(self, x):
                if Flaky.FAIL:
                    raise RuntimeError("cuDNN lost its way")
                return super().forward(x)

        NOT_CALLABLE = 3
    """))
    (tmp_path / "broken_module.py").write_text("import nonexistent_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_torchvision_teacher_builds_with_the_task_classes_and_passes_the_door_check():
    model = build_classifier("torchvision:resnet18", 10, 3, 32)
    assert model.fc.out_features == 10
    check_forward(model, "torchvision:resnet18", 10, 3, 32, need_grad=True)


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
                                  "torchvision:convnext_tiny", "torchvision:shufflenet_v2_x0_5"])
def test_common_torchvision_families_build_on_the_meta_device(spec):
    with torch.device("meta"):
        model = build_classifier(spec, 7, 3, 32)
    assert classifier_params(spec, 7, 3, 32) == sum(p.numel() for p in model.parameters())


def test_timm_models_take_the_task_classes_and_channels():
    pytest.importorskip("timm")
    model = build_classifier("timm:resnet10t", 10, 1, 8)
    check_forward(model, "timm:resnet10t", 10, 1, 8, need_grad=True)


def test_the_users_own_factory_is_imported_from_the_folder_they_run_from(user_module):
    model = build_classifier("usernets:Net", 10, 3, 32)
    check_forward(model, "usernets:Net", 10, 3, 32, need_grad=True)
    assert feature_layers("usernets:Net", "auto", model)[-1] == "features.6"


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet_nonexistent", "torchvision has no classification model 'resnet_nonexistent'"),
    ("nosuchmodule_abc:Net", "cannot import 'nosuchmodule_abc'"),
    ("broken_module:Net", "cannot import 'broken_module'"),
    ("usernets:Missing", "has no callable 'Missing'"),
    ("usernets:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("usernets:", "is not package.module:callable"),
])
def test_a_spec_that_names_nothing_is_one_line(user_module, spec, message):
    problem = check_spec(spec, "teacher")
    assert problem and message in problem and "\n" not in problem
    with pytest.raises(ConfigError, match="teacher: "):
        build_config(tiny_values(teacher=spec))


@pytest.mark.parametrize("spec, message", [
    ("usernets:not_a_module", "returned str, not a torch.nn.Module"),
    ("usernets:raises", "raised RuntimeError: weights server unreachable"),
])
def test_a_factory_that_fails_is_one_line(user_module, spec, message):
    with pytest.raises(ModelSourceError, match=message):
        build_classifier(spec, 10, 3, 32)


def test_the_door_check_refuses_wrong_outputs_and_shapes(user_module):
    with pytest.raises(ModelSourceError, match=r"outputs \(2, 11\) for 2 images in train mode; the task needs \(2, 10\)"):
        check_forward(build_classifier("usernets:wrong_classes", 10, 3, 32), "usernets:wrong_classes", 10, 3, 32)
    with pytest.raises(ModelSourceError, match=r"fails in train mode on a batch of the task's shape \(2, 1, 8, 8\)"):
        check_forward(build_classifier("torchvision:resnet18", 10, 3, 32), "torchvision:resnet18", 10, 1, 8)

    class NaNs(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    with pytest.raises(ModelSourceError, match="NaN/Inf"):
        check_forward(NaNs(), "x:y", 10, 3, 32)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(x.detach().flatten(1))

    with pytest.raises(ModelSourceError, match="no gradient flows through"):
        check_forward(Detached(), "x:y", 10, 3, 32, need_grad=True)


class Linear(nn.Module):
    """A digits classifier whose forward misbehaves in one mode or at one batch size."""

    def __init__(self, fault=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 10)
        self.fault = fault

    def forward(self, x):
        out = self.fc(self.bn(x.flatten(1)))  # (N, 10)
        if self.fault == "aux heads" and self.training:
            return out, out  # like GoogLeNet's and Inception's aux outputs in train mode
        if self.fault == "nan in train mode" and self.training:
            return out * float("nan")
        if self.fault == "batch 3 only":
            return out.view(3, -1)[:, :10].expand(x.shape[0], 10) if x.shape[0] != 3 else out
        return out


@pytest.mark.parametrize("fault, message", [
    ("aux heads", "returns a tuple in train mode, not one tensor of class scores .aux heads"),
    ("nan in train mode", "outputs NaN/Inf in train mode"),
    ("batch 3 only", "fails in train mode on a batch of the task's shape .2, 1, 8, 8."),
])
def test_the_door_check_runs_what_a_trial_runs(fault, message):
    with pytest.raises(ModelSourceError, match=message) as e:
        check_forward(Linear(fault), "mine:Net", 10, 1, 8, need_grad=True, batch_size=64)
    assert "\n" not in str(e.value)


def test_a_teacher_that_fails_at_the_runs_batch_size_is_refused_at_the_door():
    class Batch3(Linear):
        def forward(self, x):
            return super().forward(x) if x.shape[0] <= 3 else x.view(3, -1)

    Batch3().eval()(torch.randn(3, 1, 8, 8))  # the old door check's one forward passes
    with pytest.raises(ModelSourceError, match="at any batch size"):
        check_forward(Batch3().eval(), "mine:Teacher", 10, 1, 8, need_grad=True, batch_size=64)


def test_the_door_check_runs_each_mode_at_the_runs_batch_and_a_small_one():
    class Seen(Linear):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(("train" if self.training else "eval", x.shape[0]))
            return super().forward(x)

    student, teacher = Seen(), Seen()
    check_forward(student, "mine:Student", 10, 1, 8, need_grad=True, batch_size=64)
    check_forward(teacher, "mine:Teacher", 10, 1, 8, need_grad=True, batch_size=64, frozen=True)
    assert student.seen == [("train", 2), ("train", 64), ("eval", 2), ("eval", 64)]
    assert teacher.seen == [("train", 2), ("eval", 2), ("eval", 64)]  # trials run a teacher in eval mode only


def test_the_door_check_leaves_the_model_as_it_was():
    model = Linear().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_forward(model, "mine:Net", 10, 1, 8, need_grad=True, batch_size=32)
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_slow_forward_says_what_is_being_checked(monkeypatch):
    import time

    from trainable import sources

    class Slow(Linear):
        def forward(self, x):
            time.sleep(0.3)
            return super().forward(x)

    monkeypatch.setattr(sources, "SLOW_FORWARD_S", 0.05)
    lines = []
    check_forward(Slow(), "mine:Slow", 10, 1, 8, batch_size=4, log=lines.append)
    assert lines and all(line.startswith("checking mine:Slow: a forward in") for line in lines)
    assert "train mode on 2 random images (2, 1, 8, 8)" in lines[0]
    lines.clear()
    monkeypatch.undo()  # the real threshold, seconds: a fast model says nothing
    check_forward(Linear(), "mine:Fast", 10, 1, 8, batch_size=4, log=lines.append)
    assert lines == []


def test_weights_load_into_a_torchvision_teacher_and_must_fit_it(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    loaded = load_teacher(tmp_path / "r18.pt", "torchvision:resnet18", CIFAR10)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    torch.save(torchvision.models.resnet18(num_classes=100).state_dict(), tmp_path / "r18_100.pt")
    with pytest.raises(UserError, match="checkpoint has 100 output classes; task cifar10 needs 10"):
        load_teacher(tmp_path / "r18_100.pt", "torchvision:resnet18", CIFAR10)
    with pytest.raises(UserError, match="does not fit teacher architecture 'torchvision:resnet34'"):
        load_teacher(tmp_path / "r18.pt", "torchvision:resnet34", CIFAR10)
    with pytest.raises(UserError, match="needs its trained weights: pass --teacher PATH"):
        prepare_teacher(get_task("cifar10"), "torchvision:resnet18", None, log=None)


def export(model: nn.Module, path, dynamic: bool = True, channels: int = 3, size: int = 32):
    x = torch.zeros(2, channels, size, size)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), str(path))


def test_an_exported_program_is_a_teacher_with_no_code_and_no_weights_file(tmp_path, digits_data):
    torch.manual_seed(0)
    net = build_classifier("cnn", 10, 1, 8).eval()
    export(net, tmp_path / "teacher.pt2", channels=1, size=8)
    spec = as_spec(str(tmp_path / "teacher.pt2"))
    teacher, info = prepare_teacher(get_task("digits"), spec, None, log=None)  # forward + gradient checked at the door
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(teacher(x), net(x), atol=1e-5) and info["arch"] == spec
    teacher.train()
    assert not teacher.training  # a program's mode is fixed; train() does not reach into it
    run = AKDRun(build_config(tiny_values(teacher=spec, w_bn=0.0)), teacher, digits_data, torch.device("cpu"))
    assert run.fit()[-1]["epoch"] == 2
    # Its batch-norm operations are matched by the BatchNorm-statistics term, as the module's BatchNorm layers are.
    bn = AKDRun(build_config(tiny_values(teacher=spec, w_bn=0.5)), load_program(spec), digits_data, torch.device("cpu"))
    assert bn.iteration()[1] != 0.0
    plain = build_classifier("lenet5", 10, 1, 16).eval()
    export(plain, tmp_path / "plain.pt2", channels=1, size=16)
    plain_spec = as_spec(str(tmp_path / "plain.pt2"))
    with pytest.raises(ConfigError, match=f"w_bn: .* the teacher {plain_spec} has no BatchNorm layers"):
        AKDRun(build_config(tiny_values(teacher=plain_spec, w_bn=0.5, task="mnist", student="lenet5")),
               load_program(plain_spec), digits_data, torch.device("cpu"))
    with pytest.raises(UserError, match="weights are inside it; drop --teacher"):
        prepare_teacher(get_task("digits"), spec, str(tmp_path / "w.pt"), log=None)
    with pytest.raises(ConfigError, match="only a teacher can be one"):
        build_config(tiny_values(student=spec))


def test_a_program_that_fixes_its_batch_or_is_no_program_is_refused(tmp_path):
    export(build_classifier("cnn", 10, 1, 8), tmp_path / "fixed.pt2", dynamic=False, channels=1, size=8)
    with pytest.raises(ModelSourceError, match="a program: export it with dynamic_shapes"):
        prepare_teacher(get_task("digits"), str(tmp_path / "fixed.pt2"), None, log=None)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelSourceError, match="is not a torch.export program"):
        load_program(str(tmp_path / "junk.pt2"))
    assert "not found" in check_spec(str(tmp_path / "missing.pt2"), "teacher")


def test_student_size_for_foreign_families():
    # A family with a width knob is sized by student_fraction, like the project's own.
    teacher_params = classifier_params("torchvision:resnet18", 10, 3, 32)
    w = width_for_fraction("torchvision:mobilenet_v3_small", 0.05, teacher_params, 10, 3, 32)
    ratio = classifier_params("torchvision:mobilenet_v3_small", 10, 3, 32, w) / teacher_params
    assert 0.035 < ratio < 0.065 and w < 1.0
    # Without one, the task's default fraction does not apply, and one asked for is refused in one line.
    assert build_config({"task": "digits", "student": "torchvision:resnet18"}).student_fraction is None
    with pytest.raises(ConfigError, match="student_fraction: the student torchvision:resnet18 has no width"):
        build_config({"task": "digits", "student": "torchvision:resnet18", "student_fraction": 0.1})
    with pytest.raises(ModelSourceError, match="student: .* is an exported program"):
        check_student("x.pt2", 10, 3, 32)
    check_student("torchvision:mobilenet_v3_small", 10, 3, 32)


def test_feature_alignment_finds_the_stages_of_foreign_families():
    rn = build_classifier("torchvision:resnet18", 10, 3, 32)
    assert feature_layers("torchvision:resnet18", "auto", rn) == ("layer1", "layer2", "layer3", "layer4")
    mb = build_classifier("torchvision:mobilenet_v3_small", 10, 3, 32)
    layers = feature_layers("torchvision:mobilenet_v3_small", "auto", mb)
    assert len(layers) == 4 and all(n.startswith("features.") for n in layers) and layers[-1] == "features.12"
    assert feature_layers("torchvision:resnet18", "layer2, layer3", rn) == ("layer2", "layer3")
    cfg = build_config({"task": "cifar10", "teacher": "torchvision:resnet18", "student": "torchvision:resnet18",
                        "w_feature": 1.0})
    assert cfg.feature_layers == "auto"
    with pytest.raises(ConfigError, match="'nosuchlayer' is not a layer of the teacher torchvision:resnet18"):
        build_config({"task": "cifar10", "teacher": "torchvision:resnet18", "student": "torchvision:resnet18",
                      "w_feature": 1.0, "feature_layers": "nosuchlayer"})


def test_run_akd_takes_the_teacher_model_flag_and_refuses_bad_ones_in_one_line(tmp_path, user_module):
    r = run_main("trainable/run_akd.py", "--task", "digits", "--teacher-model", "usernets:Missing", "--out",
                 tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no callable 'Missing'" in r.stderr
    r = run_main("trainable/run_akd.py", "--task", "digits", "--teacher-model", "torchvision:resnet18", "--out",
                 tmp_path / "o")
    assert r.returncode == 2 and "needs its trained weights" in r.stderr
    assert not (tmp_path / "o").exists()


def test_timm_without_timm_installed_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails, as where it is not installed
    problem = check_spec("timm:resnet10t", "student")
    assert "needs timm, which is not installed; pip install timm" in problem


def test_foreign_teachers_are_folded_where_fx_can_trace_them_and_said_where_not(digits_data):
    tv = AKDRun(build_config(tiny_values(teacher="torchvision:resnet18", w_bn=0.0, task="cifar10", student="cnn",
                                         student_width=0.25)),
                build_classifier("torchvision:resnet18", 10, 3, 32), digits_data, torch.device("cpu"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tv.teacher_fwd.modules()) and not tv.notes

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.Linear(4, 10)

        def forward(self, x):
            h = self.bn(self.conv(x))
            h = h.relu() if h.sum() > 0 else h
            return self.fc(h.mean((2, 3)))

    run = AKDRun(build_config(tiny_values(w_bn=0.0)), Branchy(), digits_data, torch.device("cpu"))
    assert run.teacher_fwd is run.teacher and "cannot be traced by torch.fx" in run.notes[0]
    assert run.fit()[-1]["epoch"] == 2


def test_a_student_with_aux_heads_is_one_line_on_the_command_line(user_module):
    torch.save(build_classifier("usernets:Net", 2, 3, 32).state_dict(), user_module / "t.pt")  # the task's 2 classes
    r = run_main("trainable/run_akd.py", "--task", "folder:" + str(make_folder_task(user_module)), "--teacher-model",
                 "usernets:Net", "--teacher", user_module / "t.pt", "--set", "student=usernets:Aux", "--out",
                 user_module / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "usernets:Aux returns a tuple in train mode" in r.stderr and "aux_logits=False" in r.stderr
    assert not (user_module / "run").exists()


def make_folder_task(root):
    """Two classes of four 32 x 32 RGB PNGs: a folder task the user's 3-channel nets fit."""
    from PIL import Image

    folder = root / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 100 if c == "a" else 0, 0)).save(folder / c / f"{i}.png")
    return folder


def test_a_failure_inside_the_speed_measurement_is_one_line(user_module):
    import usernets

    from trainable.measure import time_candidates
    from trainable.tasks import EvalData

    check_student("usernets:Flaky", 10, 3, 32)  # passes its door check
    values = {k: v for k, v in tiny_values().items() if k != "student_width"}  # a foreign student has no width
    cfg = build_config({**values, "task": "cifar10", "teacher": "usernets:Net", "student": "usernets:Flaky",
                        "student_fraction": None, "w_bn": 0.0})
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    usernets.Flaky.FAIL = True
    try:
        with pytest.raises(UserError, match="a run of teacher usernets:Net and student usernets:Flaky fails while its "
                                            "speed is measured .RuntimeError: cuDNN lost its way.") as e:
            time_candidates(cfg, build_classifier("usernets:Net", 10, 3, 32).eval(), EvalData(x, y, x, y),
                            torch.device("cpu"), [("fp32", False)])
        assert "\n" not in str(e.value)
    finally:
        usernets.Flaky.FAIL = False
