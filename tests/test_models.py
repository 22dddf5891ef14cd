"""Every registry entry builds and runs one forward pass on CPU; pinned parameter counts."""
import pytest
import torch

from trainable.losses import GENERATOR_LOSSES, STUDENT_LOSSES, balance_loss, onehot_loss
from trainable.models import (
    CLASSIFIERS,
    GENERATORS,
    build_classifier,
    build_generator,
    classifier_params,
    count_params,
    width_for_fraction,
)
from trainable.tasks import TASKS

# (task, image size, channels) pairs each classifier is meant for.
SHAPES = {
    "resnet34": ("cifar100",), "resnet34_w": ("cifar100",), "resnet34_tv": ("cifar100",),
    "resnet18": ("cifar10",), "resnet18_half": ("cifar100",), "cnn": ("digits", "mnist"), "lenet5": ("mnist",),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_every_classifier_forward(name):
    assert set(SHAPES) == set(CLASSIFIERS), "add the new model to SHAPES"
    for task_name in SHAPES[name]:
        t = TASKS[task_name]
        torch.manual_seed(0)
        model = build_classifier(name, t.num_classes, t.channels, t.image_size).eval()
        with torch.no_grad():
            out = model(torch.randn(2, t.channels, t.image_size, t.image_size))
        assert out.shape == (2, t.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_generator_forward(name, task_name):
    t = TASKS[task_name]
    g = build_generator(name, 32, 16, t.channels, t.image_size)
    out = g(torch.randn(4, 32))
    assert out.shape == (4, t.channels, t.image_size, t.image_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(STUDENT_LOSSES) + sorted(GENERATOR_LOSSES))
def test_every_loss(name):
    fn = {**STUDENT_LOSSES, **GENERATOR_LOSSES}[name]
    s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    loss = fn(s, t, 2.0)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if name in STUDENT_LOSSES:  # imitation losses vanish when the student equals the teacher
        assert fn(t, t, 2.0).abs().item() < 1e-6


def test_dafl_terms():
    uniform = torch.zeros(4, 10)
    assert balance_loss(uniform).abs().item() < 1e-5
    assert balance_loss(torch.eye(10)[[0, 0, 0, 0]] * 50) > 2.0
    assert onehot_loss(torch.eye(10)[:4] * 50) < 1e-3


def test_pinned_parameter_counts():
    assert classifier_params("resnet34", 100, 3, 32) == 21_328_292
    assert classifier_params("resnet18", 100, 3, 32) == 11_220_132
    half = classifier_params("resnet18_half", 100, 3, 32)
    assert 2_700_000 < half < 2_900_000
    assert classifier_params("resnet34_tv", 100, 3, 32) == 21_335_972


def test_meta_count_equals_real_count():
    real = build_classifier("resnet18", 100, 3, 32, width=0.25)
    assert count_params(real) == classifier_params("resnet18", 100, 3, 32, 0.25)


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5])
def test_width_for_fraction_is_closest(fraction):
    teacher = 21_328_292
    w = width_for_fraction("resnet18", fraction, teacher, 100, 3, 32)
    got = classifier_params("resnet18", 100, 3, 32, w)
    target = fraction * teacher
    for neighbour in (w - 1 / 64, w + 1 / 64):  # the next channel counts on the grid are no closer
        assert abs(got - target) <= abs(classifier_params("resnet18", 100, 3, 32, neighbour) - target)
    assert abs(got / teacher - fraction) < 0.05


def test_cifar_resnet_names_match_published_checkpoints():
    keys = build_classifier("resnet34", 100, 3, 32).state_dict().keys()
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
              "layer2.0.shortcut.1.running_var", "layer4.2.bn2.weight", "linear.weight", "linear.bias"):
        assert k in keys


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="choose from"):
        build_classifier("vgg", 10, 3, 32)
    with pytest.raises(ValueError, match="choose from"):
        build_generator("gan", 10, 8, 3, 32)
