"""Did the distillation work? The student's share of its teacher's held-out accuracy, and a plain word on it.

Data-free distillation fails silently: a generator collapsed to a few classes, or a student stuck at chance while
its loss falls, still ends with a student. Every run (``final.json``) and every search (``best/metrics.json``) ends
with:

- ``teacher_share``: the student's held-out test accuracy over the teacher's on the same images; where the task has
  no labels, the student's test agreement with the teacher (the teacher agrees with itself everywhere).
- ``verdict``: ``reached`` at or above ``SHARE_BAR`` of the teacher, ``below`` under it, ``unknown`` where nothing
  was measured.
- ``verdict_cause``: below the bar, the likeliest cause read off the run's own epochs, with what to try.

``SHARE_BAR`` is 0.90: the field's published students reach 0.99 of their teachers (DFAD on MNIST LeNet-5 ->
LeNet-5-half: 98.3 against 98.9) and the project's default digits search ends near 0.98, so a student under 0.90
of its teacher has not learned what the teacher knows, whatever its size.

The causes, in the order they are tried on a run's epochs (``history``, the per-epoch metrics):

1. the generator collapsed: in its last epoch the teacher saw its images as fewer than ``collapse_bar(K)`` effective
   classes (``gen_classes``; the square root of the class count, at least 1.5);
2. the student never rose clearly above chance (its best validation accuracy under twice 1/K);
3. it was still improving when it ended (its best epoch in the last fifth of the run, and better than the epoch a
   fifth earlier): a longer run;
4. otherwise the student plateaued below its teacher: a larger student, or other generator terms.
"""
from __future__ import annotations

import math
from typing import Any

from base import metrics as M

SHARE_BAR = 0.90  # a student under this share of its teacher's held-out accuracy "did not reach the teacher"
REACHED, BELOW, UNKNOWN = "reached", "below", "unknown"


def collapse_bar(num_classes: int) -> float:
    """Effective classes (``gen_classes``) under which a generator is called collapsed: sqrt(K), at least 1.5."""
    return max(1.5, math.sqrt(num_classes))


def collapsed(gen_classes: float | None, num_classes: int) -> bool:
    return gen_classes is not None and gen_classes < collapse_bar(num_classes)


def collapse_words(gen_classes: float, num_classes: int) -> str:
    """How a collapse is named wherever it is shown (live view, run output, report)."""
    return (f"generator collapsed: the teacher sees its images as {gen_classes:.1f} of {num_classes} classes "
            f"(under {collapse_bar(num_classes):.1f})")


def teacher_share(final: dict[str, Any]) -> float | None:
    """The student's held-out accuracy over the teacher's (test agreement without labels); None if not measured."""
    acc, teacher = final.get(M.TEST_ACC), final.get(M.TEACHER_TEST_ACC)
    if acc is not None and teacher:
        return float(acc) / float(teacher)
    agreement = final.get(M.TEST_AGREEMENT)
    return None if agreement is None else float(agreement)


def judge(final: dict[str, Any], history: list[dict[str, Any]], num_classes: int,
          setting: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{teacher_share, verdict, verdict_cause}`` of a finished run (or a search's winner) from its final metrics,
    its epochs and (for the advice) its config ``setting``."""
    share = teacher_share(final)
    if share is None:
        return {M.TEACHER_SHARE: None, M.VERDICT: UNKNOWN, M.VERDICT_CAUSE: None}
    if share >= SHARE_BAR:
        return {M.TEACHER_SHARE: share, M.VERDICT: REACHED, M.VERDICT_CAUSE: None}
    return {M.TEACHER_SHARE: share, M.VERDICT: BELOW, M.VERDICT_CAUSE: likeliest_cause(history, num_classes, setting)}


def likeliest_cause(history: list[dict[str, Any]], num_classes: int, setting: dict[str, Any] | None = None) -> str:
    """Why a student stayed below its teacher, read off its epochs, and what to try (one line), the advice fitted to
    the run's config ``setting`` where given."""
    last = history[-1] if history else {}
    spread = last.get(M.GEN_CLASSES)
    if collapsed(spread, num_classes):
        return (f"the {collapse_words(spread, num_classes)}, so the student saw few of them; try a stronger "
                "class-balance term (w_balance, DAFL's: method=dafl) or a lower lr_generator")
    key = M.VAL_ACC if any(h.get(M.VAL_ACC) is not None for h in history) else M.VAL_AGREEMENT
    curve = [float(h[key]) for h in history if h.get(key) is not None]
    if key == M.VAL_ACC and curve and max(curve) < 2.0 / num_classes:
        kl = (setting or {}).get("student_loss") == "kl"
        return ("the student never rose clearly above chance (best val_acc "
                f"{max(curve):.3f}, chance {1 / num_classes:.3f}): what it learned on the generated images does not "
                "hold on real ones; try " + (
                    "another learning rate, a longer run (epochs, iters_per_epoch) or AVKD's prior images "
                    "(method=avkd)" if kl else
                    "KL for both players (student_loss=kl, generator_loss=neg_kl) with a student without BatchNorm "
                    "(student=lenet5 where it takes the images) and student_grad_clip=1, which lifted LeNet-5 "
                    "students from chance (docs/methods.md)"))
    tail = max(1, len(curve) // 5)
    if len(curve) > tail and curve.index(max(curve)) >= len(curve) - tail and curve[-1] > curve[-1 - tail]:
        return (f"it was still improving when it ended ({key} {curve[-1 - tail]:.3f} -> {curve[-1]:.3f} over its last "
                f"{tail} epoch(s)): give it more epochs or iterations (epochs, iters_per_epoch)")
    return ("it plateaued below its teacher: try a larger student (student_fraction), or other generator terms "
            "(method=dafl; w_bn where the teacher has BatchNorm)")


def verdict_line(v: dict[str, Any], teacher_word: str = "the teacher's held-out accuracy") -> str | None:
    """The one line a CLI prints at the end: the share and, below the bar, why and what to try; None if unknown."""
    share = v.get(M.TEACHER_SHARE)
    if share is None:
        return None
    if v.get(M.VERDICT) == REACHED:
        return f"verdict: the student reached {share:.1%} of {teacher_word} (bar {SHARE_BAR:.0%})"
    return (f"verdict: the distillation did NOT reach the teacher: the student has {share:.1%} of {teacher_word} "
            f"(bar {SHARE_BAR:.0%}); likeliest cause: {v.get(M.VERDICT_CAUSE)}")
