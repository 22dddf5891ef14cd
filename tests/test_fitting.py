"""The recipe fitted to the teacher, the generator's class spread, and the verdict on whether a run reached its
teacher."""
import json

import pytest
import torch
import torch.nn as nn

from base import metrics as M
from base.verdict import BELOW, REACHED, SHARE_BAR, collapse_bar, collapsed, judge, likeliest_cause, verdict_line
from conftest import tiny_values
from trainable.akd import AKDRun
from trainable.config import build_config
from trainable.evaluation import effective_classes
from trainable.fitting import BN_FREE, fit_task, normalisation
from trainable.losses import TeacherProbe, has_batch_norm
from trainable.models import build_classifier
from trainable.outputs import finish_run, teacher_metrics
from trainable.sources import ExportedTeacher
from trainable.tasks import get_task


def program_of(model: nn.Module, channels: int = 1, size: int = 8) -> ExportedTeacher:
    x = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return ExportedTeacher(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)).module())


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


def test_what_the_teacher_offers_is_found_in_code_and_inside_a_program():
    torch.manual_seed(0)
    bn, plain = build_classifier("cnn", 10, 1, 8), build_classifier("lenet5", 10, 1, 32)
    assert normalisation(bn) == "batchnorm" and normalisation(plain) == "none"
    assert normalisation(WithLayerNorm()) == "layernorm"
    assert normalisation(program_of(bn)) == "batchnorm"  # the batch-norm operations of its graph, tapped
    assert normalisation(program_of(plain, size=32)) == "none"


def test_the_batchnorm_term_inside_a_program_is_the_same_as_in_code():
    torch.manual_seed(0)
    net = build_classifier("cnn", 10, 1, 8).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that are not the defaults, so the term is not trivial
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    program = program_of(net)
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    assert torch.allclose(program(x), net(x), atol=1e-5)  # the taps change nothing the program computes
    losses = []
    for model in (net, program):
        probe = TeacherProbe(model, None, want_bn=True, want_features=False)
        probe.start()
        model(x)
        probe.stop()
        losses.append(probe.bn_loss())
    assert len(losses[0].shape) == 0 and losses[0].item() > 0
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    losses[1].backward()
    assert x.grad.abs().sum() > 0  # the generator learns through it


def test_a_teacher_with_batchnorm_keeps_the_recipe_and_says_so():
    task = get_task("digits")
    fitted = fit_task(task, build_classifier("cnn", 10, 1, 8), "cnn")
    assert fitted.task.defaults == task.defaults and fitted.norm == "batchnorm"
    assert fitted.line == ("recipe: the BatchNorm-statistics term (w_bn 0.1), for the teacher cnn has BatchNorm "
                           "statistics to match")


def test_a_teacher_without_batchnorm_takes_the_measured_recipe_and_a_student_without_batchnorm():
    import dataclasses

    mnist = get_task("mnist")  # 28 px; its recipe's student is LeNet-5 already
    task = dataclasses.replace(mnist, defaults={**mnist.defaults, "student": "cnn", "w_bn": 0.1})  # the small recipe's
    fitted = fit_task(task, build_classifier("lenet5", 10, 1, 28), "lenet5")
    assert fitted.norm == "none"
    assert {k: fitted.task.defaults[k] for k in BN_FREE} == BN_FREE
    assert fitted.task.defaults["student"] == "lenet5" and not has_batch_norm(build_classifier("lenet5", 10, 1, 28))
    assert "no BatchNorm statistics to match (no normalisation layers)" in fitted.line and "lenet5 student" in fitted.line
    cfg = build_config({"task": "mnist"}, task=fitted.task)
    assert (cfg.student_loss, cfg.generator_loss, cfg.w_bn, cfg.student, cfg.student_grad_clip) == (
        "kl", "neg_kl", 0.0, "lenet5", 1.0)
    # A value the user sets is never overridden.
    mine = build_config({"task": "mnist", "student_loss": "l1", "student": "cnn", "w_onehot": 0.5}, task=fitted.task)
    assert (mine.student_loss, mine.student, mine.w_onehot) == ("l1", "cnn", 0.5)


def test_a_teacher_without_batchnorm_keeps_a_student_the_project_has_no_stand_in_for():
    fitted = fit_task(get_task("cifar100"), WithLayerNorm(), "timm:vit_tiny")  # a ResNet-18 student, 32 px colour
    assert fitted.task.defaults["student"] == "resnet18" and fitted.task.defaults["student_loss"] == "kl"
    assert "the recipe's resnet18 student (its gradient clipped at 1)" in fitted.line


def test_where_no_student_without_batchnorm_takes_the_images_the_line_says_so():
    fitted = fit_task(get_task("digits"), WithLayerNorm(), "mynets:Net")  # 8 px: too small for LeNet-5
    assert fitted.norm == "layernorm" and fitted.task.defaults["student"] == "cnn"
    assert fitted.task.defaults["w_bn"] == 0.0 and "(LayerNorm/GroupNorm only)" in fitted.line
    assert "no student without BatchNorm here takes 8 px images" in fitted.line


def test_effective_classes_of_a_histogram():
    assert effective_classes(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert effective_classes(torch.tensor([0, 20, 0, 0])) == pytest.approx(1.0)
    assert effective_classes(torch.tensor([0, 0])) == pytest.approx(1.0)  # nothing counted yet
    assert collapse_bar(10) == pytest.approx(10 ** 0.5) and collapse_bar(2) == 1.5
    assert collapsed(1.0, 10) and not collapsed(8.0, 10) and not collapsed(None, 10)


class OneImage(nn.Module):
    """A generator collapsed to one image: whatever the noise, the same picture."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = nn.Parameter(image)  # (1, C, H, W)

    def forward(self, z):
        return self.image.expand(z.shape[0], -1, -1, -1)


@pytest.mark.filterwarnings("ignore:Detected call of")  # the generator's schedule: moot here
def test_a_generator_that_emits_one_image_is_named_collapsed(digits_teacher, digits_data, capsys, tmp_path):
    from trainable.run_akd import _epoch_output

    cfg = build_config(tiny_values(epochs=2, w_bn=0.0, precision="fp32", channels_last=False))
    run = AKDRun(cfg, digits_teacher, digits_data, torch.device("cpu"))
    run.generator = OneImage(torch.randn(1, 1, 8, 8))
    run.opt_generator = torch.optim.Adam(run.generator.parameters(), lr=cfg.lr_generator)
    history = run.fit()
    assert [h[M.GEN_CLASSES] for h in history] == [pytest.approx(1.0)] * 2
    cause = likeliest_cause(history, 10)
    assert cause.startswith("the generator collapsed: the teacher sees its images as 1.0 of 10 classes")
    assert "w_balance" in cause
    # The run's own epoch line names it.
    _, on_epoch = _epoch_output(cfg, run, tmp_path, tmp_path / "checkpoint.pt")
    on_epoch(history[-1], run)
    assert "generator collapsed: the teacher sees its images as 1.0 of 10 classes (under 3.2)" in capsys.readouterr().out


def test_a_healthy_generator_spreads_over_the_classes(digits_teacher, digits_data):
    cfg = build_config(tiny_values(epochs=1, precision="fp32", channels_last=False))
    h = AKDRun(cfg, digits_teacher, digits_data, torch.device("cpu")).fit()
    assert 1.0 <= h[-1][M.GEN_CLASSES] <= 10.0


@pytest.mark.filterwarnings("ignore:Detected call of")  # a frozen generator is never stepped
def test_a_run_that_stays_far_below_its_teacher_ends_with_the_verdict_and_its_cause(digits_teacher, digits_data,
                                                                                     tmp_path):
    """A generator frozen at its initial weights: the student sees one fixed distribution of noise images."""
    cfg = build_config(tiny_values(epochs=3, w_bn=0.0, precision="fp32", channels_last=False))
    run = AKDRun(cfg, digits_teacher, digits_data, torch.device("cpu"))
    run.generator.requires_grad_(False)
    run.generator_step = lambda: {M.LOSS_GENERATOR: 0.0}  # frozen: never updated
    run.fit()
    final = finish_run(run, tmp_path, teacher_metrics(run.teacher, digits_data), 1.0)
    assert final[M.VERDICT] == BELOW and final[M.TEACHER_SHARE] < SHARE_BAR
    assert final[M.TEACHER_SHARE] == pytest.approx(final[M.TEST_ACC] / final[M.TEACHER_TEST_ACC])
    assert final[M.VERDICT_CAUSE]
    line = verdict_line(final)
    assert line.startswith("verdict: the distillation did NOT reach the teacher: the student has ")
    assert "likeliest cause: " in line and final[M.VERDICT_CAUSE] in line


@pytest.mark.parametrize("history, needle", [
    ([{M.VAL_ACC: 0.1, M.GEN_CLASSES: 9.0}] * 5, "never rose clearly above chance"),
    ([{M.VAL_ACC: a, M.GEN_CLASSES: 9.0} for a in (0.3, 0.4, 0.5, 0.6, 0.7)], "still improving when it ended"),
    ([{M.VAL_ACC: a, M.GEN_CLASSES: 9.0} for a in (0.6, 0.7, 0.7, 0.69, 0.7)], "plateaued below its teacher"),
    ([{M.VAL_ACC: 0.7, M.GEN_CLASSES: 2.0}] * 5, "generator collapsed"),
])
def test_the_likeliest_cause_is_read_off_the_epochs(history, needle):
    assert needle in likeliest_cause(history, 10)


def test_the_verdict_reached_and_without_labels():
    v = judge({M.TEST_ACC: 0.95, M.TEACHER_TEST_ACC: 0.97}, [], 10)
    assert v[M.VERDICT] == REACHED and v[M.VERDICT_CAUSE] is None
    assert verdict_line(v) == "verdict: the student reached 97.9% of the teacher's held-out accuracy (bar 90%)"
    no_labels = judge({M.TEST_ACC: None, M.TEACHER_TEST_ACC: None, M.TEST_AGREEMENT: 0.5}, [{M.VAL_AGREEMENT: 0.5}], 10)
    assert no_labels[M.VERDICT] == BELOW and no_labels[M.TEACHER_SHARE] == 0.5
    assert judge({}, [], 10)[M.VERDICT] == "unknown" and verdict_line(judge({}, [], 10)) is None
    json.dumps(v)  # plain data: it goes into final.json and best/metrics.json
