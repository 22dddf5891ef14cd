"""The student's size: its width multiplier from ``student_fraction`` (or ``student_width``) and its costs
(``param_ratio``, ``flops``), known without training or allocating it. What a run builds its student with, and what a
search checks each proposed setting against its budget with."""
from __future__ import annotations

import torch

from base import metrics as M
from trainable.config import AKDConfig
from trainable.models import build_classifier, count_flops, count_params, width_for_fraction


def student_width(cfg: AKDConfig, teacher_params: int) -> float:
    """The student's width multiplier: ``student_width``, or the one closest to ``student_fraction`` of the teacher."""
    if cfg.student_fraction is None:
        return cfg.student_width
    t = cfg.task_spec
    return width_for_fraction(cfg.student, cfg.student_fraction, teacher_params, t.num_classes, t.channels, t.image_size)


def student_costs(cfg: AKDConfig, teacher_params: int) -> dict[str, float]:
    """The student's ``param_ratio`` and ``flops``, exactly as its run will report them, without training or
    allocating it (built on the meta device): what a search checks against its budget before a trial starts."""
    t = cfg.task_spec
    width = student_width(cfg, teacher_params)
    with torch.device("meta"):
        student = build_classifier(cfg.student, t.num_classes, t.channels, t.image_size, width)
    return {M.PARAM_RATIO: count_params(student) / teacher_params, M.FLOPS: count_flops(student, t.channels, t.image_size)}
