"""The recipe fitted to the teacher: what the teacher offers the generator, and the defaults that work for it.

A task's recipe (``trainable.tasklist``) is sized to its images. What guides the generator depends on the teacher:

- **BatchNorm statistics** (BatchNorm layers in code, or batch-norm operations inside a ``.pt2`` program's graph,
  tapped by ``trainable.losses.tap_batch_norms``): the recipe stands as it is, its BatchNorm-statistics term
  (``w_bn``, DeepInversion/DFQ) included where it has one.
- **None** (LeNet-style nets, LayerNorm models such as ViT or ConvNeXt, a program without batch-norm operations):
  there is nothing for ``w_bn`` to match, and DFAD's loop alone leaves the student near chance on such a teacher
  (``bench/bnfree_teacher.py``). The recipe takes ``BN_FREE`` instead, measured by that bench.

Defaults only: ``fit_task`` changes the task's defaults, beneath every value a user sets (a space's ``fixed`` and
``params``, ``--set``), so a value the user sets is never overridden. The choice is said in one line before
training (``FittedTask.line``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from trainable.losses import has_batch_norm
from trainable.models import size_problem
from trainable.tasklist import Task

# The recipe for a teacher without BatchNorm statistics (bench/bnfree_teacher.py; docs/methods.md). On a LeNet-5
# teacher without BatchNorm (32 px digits, 15 epochs of 20 iterations), only this pair lifted the student from
# chance: L1 on logits (DFAD's) let the generator drive the teacher's logits up until a BatchNorm-free student's
# ReLUs died (0.09), and a student with BatchNorm learned the generated images' statistics, not the real ones
# (0.12-0.18 with KL, with DAFL's terms, or with both), while the KL pair with a LeNet-5 student reached 0.944
# held out against the teacher's 0.974; DAFL's terms on top of it lowered that to 0.884. Without BatchNorm the student
# is also sensitive to its learning rate (0.10 held out at lr_student 0.22, where 0.02 gave 0.96): its gradient's norm
# clipped at 1 made that 0.90.
BN_FREE: dict[str, Any] = dict(w_bn=0.0, student_loss="kl", generator_loss="neg_kl", student_grad_clip=1.0)
# A student without BatchNorm in place of the recipe's student with it, where it takes the task's images: LeNet-5
# (DFAD's MNIST pair) for the small recipe's CNN. Other students (the CIFAR recipes' ResNet-18) stay.
BN_FREE_STUDENTS = {"cnn": "lenet5"}


def normalisation(model: nn.Module) -> str:
    """What the teacher normalises with: ``batchnorm`` (statistics to match), ``layernorm`` (LayerNorm or
    GroupNorm, nothing to match) or ``none``."""
    if has_batch_norm(model):
        return "batchnorm"
    if any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in model.modules()):
        return "layernorm"
    return "none"


@dataclasses.dataclass(frozen=True)
class FittedTask:
    task: Task  # the task with its defaults fitted to the teacher
    norm: str  # batchnorm | layernorm | none
    line: str  # the choice, said once before training


def fit_task(task: Task, teacher: nn.Module, arch: str) -> FittedTask:
    """``task`` with its recipe fitted to ``teacher`` (named ``arch`` in the line)."""
    norm = normalisation(teacher)
    if norm == "batchnorm":
        w_bn = task.defaults.get("w_bn", 0.0)
        how = f"the BatchNorm-statistics term (w_bn {w_bn:g})" if w_bn else "DFAD's loop"
        return FittedTask(task, norm, f"recipe: {how}, for the teacher {arch} has BatchNorm statistics to match")
    what = "LayerNorm/GroupNorm only" if norm == "layernorm" else "no normalisation layers"
    defaults = {**task.defaults, **BN_FREE}
    student = defaults.get("student")
    plain = BN_FREE_STUDENTS.get(student, student)
    if plain != student and size_problem(plain, task.image_size) is None:
        defaults["student"] = student = plain
        said = f"a {student} student without BatchNorm"
    elif plain != student:
        said = (f"the recipe's {student} student (no student without BatchNorm here takes {task.image_size} px images; "
                "name one with student= if you have one)")
    else:
        said = f"the recipe's {student} student"
    line = (f"recipe: the teacher {arch} has no BatchNorm statistics to match ({what}): KL between teacher and "
            f"student for both players (student_loss kl, generator_loss neg_kl), {said} (its gradient clipped at "
            f"{BN_FREE['student_grad_clip']:g}), no w_bn")
    return FittedTask(dataclasses.replace(task, defaults=defaults), norm, line)
