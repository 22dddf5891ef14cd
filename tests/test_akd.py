"""The AKD loop: golden losses, frozen teacher, no wasted gradients, resume, NaN handling."""
import math

import pytest
import torch

from base import metrics as M
from base.errors import CheckpointError, NonFiniteLossError
from conftest import tiny_values
from trainable.akd import AKDRun
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import build_config
from trainable.models import build_classifier


def random_teacher(seed=0):
    torch.manual_seed(seed)
    return build_classifier("cnn", 10, 1, 8).eval()


def make_run(teacher, data, **overrides):
    return AKDRun(build_config(tiny_values(**overrides)), teacher, data, torch.device("cpu"))


# Recorded from a fixed-seed run (seed 0, tiny config, random-init teacher) on CPU.
GOLDEN = {
    "student": [0.3488015830516815, 0.2972160577774048, 0.2112048864364624, 0.11528150737285614],
    "generator": [-0.2022523134946823, -0.12911838293075562],
}


def test_golden_losses_of_a_fixed_seed_two_step_run(digits_data):
    # Plain DFAD objective, fp32 and contiguous, so that the numbers do not depend on the CPU's bf16 support.
    run = make_run(random_teacher(), digits_data, epochs=1, w_bn=0.0, precision="fp32", channels_last=False)
    student, generator = [], []
    for _ in range(2):
        student += [run.student_step()[M.LOSS_STUDENT] for _ in range(2)]
        generator.append(run.generator_step()[M.LOSS_GENERATOR])
    assert student == pytest.approx(GOLDEN["student"], rel=1e-4)
    assert generator == pytest.approx(GOLDEN["generator"], rel=1e-4)


def test_same_seed_same_numbers(digits_data):
    a = make_run(random_teacher(), digits_data).fit()
    b = make_run(random_teacher(), digits_data).fit()
    strip = lambda h: [{k: v for k, v in m.items() if k != M.IMAGES_PER_S} for m in h]  # noqa: E731
    assert strip(a) == strip(b)


def test_teacher_stays_frozen_and_bit_identical(digits_teacher, digits_data):
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    run = make_run(digits_teacher, digits_data, w_bn=0.1, w_activation=0.1, w_onehot=0.1, w_balance=0.1)
    run.fit()
    assert not run.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in run.teacher.parameters())
    after = run.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included


def test_generator_step_computes_no_student_or_teacher_weight_gradients(digits_data):
    run = make_run(random_teacher(), digits_data)
    run.student.zero_grad(set_to_none=True)
    run.generator_step()
    assert all(p.grad is None for p in run.student.parameters())
    assert all(p.grad is None for p in run.teacher.parameters())
    assert all(p.requires_grad for p in run.student.parameters())  # restored for the student step
    assert any(p.grad is not None for p in run.generator.parameters())


def test_student_step_leaves_the_generator_alone(digits_data):
    run = make_run(random_teacher(), digits_data)
    g_before = [p.clone() for p in run.generator.parameters()]
    run.student_step()
    assert all(p.grad is None for p in run.generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g_before, run.generator.parameters()))


@pytest.mark.parametrize("ns, ng", [(5, 1), (1, 5), (15, 1)])
def test_step_ratios(digits_data, ns, ng):
    h = make_run(random_teacher(), digits_data, n_student=ns, n_generator=ng, epochs=1, iters_per_epoch=1).fit()
    assert len(h) == 1 and set(h[0]) == set(M.EPOCH_METRICS) - {M.LOSS_DISCRIMINATOR, M.VAL_AGREEMENT}  # AVKD; agreement
    assert all(math.isfinite(v) for v in h[0].values())


@pytest.mark.parametrize("sched", ["multistep", "cosine", "exponential", "none"])
def test_schedulers(digits_data, sched):
    run = make_run(random_teacher(), digits_data, scheduler=sched, epochs=3, gamma=0.5, milestones=(0.5,))
    lrs = [m[M.LR_STUDENT] for m in run.fit()]
    assert lrs[0] == pytest.approx(0.1)
    if sched == "none":
        assert lrs == [0.1] * 3
    else:
        assert lrs[-1] < lrs[0]


def test_resume_equals_uninterrupted_run(tmp_path, digits_data):
    teacher = random_teacher()
    full = make_run(teacher, digits_data, epochs=4, scheduler="cosine").fit()
    first = make_run(teacher, digits_data, epochs=4, scheduler="cosine")
    first.fit(max_epochs=2)
    save_checkpoint(first, tmp_path / "ck.pt")
    # Advance the global RNG: the resumed run must not depend on what happened in between.
    torch.randn(1000)
    second = make_run(teacher, digits_data, epochs=4, scheduler="cosine")
    second.load_state_dict(load_checkpoint(tmp_path / "ck.pt"))
    resumed = second.fit()
    strip = lambda h: [{k: v for k, v in m.items() if k != M.IMAGES_PER_S} for m in h]  # noqa: E731
    assert strip(resumed) == strip(full)


def test_checkpoint_mismatches_are_one_line(tmp_path, digits_data):
    run = make_run(random_teacher(), digits_data)
    save_checkpoint(run, tmp_path / "ck.pt")
    other = make_run(random_teacher(), digits_data, lr_student=0.05)
    with pytest.raises(CheckpointError, match="different config: lr_student"):
        other.load_state_dict(load_checkpoint(tmp_path / "ck.pt"))
    other_teacher = make_run(random_teacher(seed=1), digits_data)
    with pytest.raises(CheckpointError, match="different teacher"):
        other_teacher.load_state_dict(load_checkpoint(tmp_path / "ck.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_raises_naming_step_and_loss(digits_data):
    run = make_run(random_teacher(), digits_data, lr_student=1e30, momentum=0.0, weight_decay=0.0)
    with pytest.raises(NonFiniteLossError, match=r"loss_(student|generator) became (nan|inf) at epoch 1 iteration \d+"):
        run.fit()


def test_early_stop(digits_data):
    run = make_run(random_teacher(), digits_data, epochs=20, early_stop_patience=1, lr_student=1e-6,
                   lr_generator=1e-6)
    history = run.fit()
    assert run.stopped_early and len(history) < 20


def test_bf16_autocast_runs_on_cpu(digits_data):
    h = make_run(random_teacher(), digits_data, precision="bf16", channels_last=True, epochs=1).fit()
    assert math.isfinite(h[0][M.VAL_LOSS])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path(digits_data):
    run = AKDRun(build_config(tiny_values(precision="bf16", channels_last=True)), random_teacher(), digits_data,
                 torch.device("cuda"))
    h = run.fit()
    assert next(run.student.parameters()).is_cuda and math.isfinite(h[-1][M.VAL_LOSS])


def test_a_checkpoint_from_before_the_methods_resumes(tmp_path, digits_data):
    """Checkpoints written before method, AVKD and feature alignment existed."""
    from trainable.config import FIELDS, METHOD_KEYS

    teacher = random_teacher()
    first = make_run(teacher, digits_data, epochs=2)
    first.fit(max_epochs=1)
    ckpt = first.state_dict()
    new_keys = {"method", "w_disagreement", "w_feature", "w_feature_adv", "feature_layers", "feature_projection",
                *METHOD_KEYS["avkd"]}
    assert new_keys <= set(FIELDS)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in new_keys}
    again = make_run(teacher, digits_data, epochs=2)
    again.load_state_dict(ckpt)
    assert again.epoch == 1
    with pytest.raises(CheckpointError, match="different config"):
        make_run(teacher, digits_data, epochs=2, w_feature=1.0).load_state_dict(ckpt)


def test_deterministic_asks_pytorch_for_deterministic_algorithms(digits_data):
    """``deterministic: true``: PyTorch's deterministic algorithms and cuDNN's benchmarking off; two runs agree."""
    try:
        runs = [make_run(random_teacher(), digits_data, deterministic=True, epochs=1).fit() for _ in range(2)]
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        strip = [[{k: v for k, v in m.items() if k != M.IMAGES_PER_S} for m in h] for h in runs]
        assert strip[0] == strip[1]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_a_new_generator_term_is_two_places_and_runs(digits_data, monkeypatch):
    """A term of one's own: its weight's field (here on a config of its own) and its entry in the registry. The run
    adds it to the generator's loss, times its weight, and leaves it out at weight 0."""
    import dataclasses

    from trainable import terms
    from trainable.config import AKDConfig

    EdgeConfig = dataclasses.make_dataclass("EdgeConfig", [("w_edge", float, dataclasses.field(default=0.0))],
                                            bases=(AKDConfig,), frozen=True)  # place 1: the weight's field
    seen = []
    monkeypatch.setitem(terms.GENERATOR_TERMS, "w_edge", terms.Term(  # place 2: the term
        lambda run, s: seen.append(s.t_logits.shape) or s.t_logits.pow(2).mean(), what="a term of one's own"))
    base = build_config(tiny_values(epochs=1, precision="fp32", channels_last=False))
    losses = {}
    for weight in (0.0, 3.0):
        cfg = EdgeConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(AKDConfig)}, w_edge=weight)
        run = AKDRun(cfg, random_teacher(), digits_data, torch.device("cpu"))
        losses[weight] = run.generator_step()[M.LOSS_GENERATOR]
    assert len(seen) == 1 and seen[0][0] == base.batch_size  # called at weight 3 only
    assert losses[3.0] > losses[0.0]  # a squared mean of the teacher's logits, times 3, was added
    assert "w_edge" in terms.term_weights()
