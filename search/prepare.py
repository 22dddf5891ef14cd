"""What a search prepares on the driver before Ray starts: the teacher and the evaluation data, the budget check,
the checks that a setting can make a run, and the speed every trial computes at.

Every check here runs before anything is written, so a refused command leaves nothing behind.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from base.errors import UserError
from search.budget import BudgetCheck, check_reachable
from search.cluster import trial_device, trial_threads
from search.plan import SearchPlan
from search.space import typical_config
from trainable.akd import AKDRun, fingerprint
from trainable.config import build_config
from trainable.fitting import fit_task
from trainable.measure import choose_speed
from trainable.models import count_params
from trainable.outputs import teacher_metrics
from trainable.sources import check_student
from trainable.speed import Speed, torch_threads
from trainable.tasks import data_free, load_eval_data
from trainable.teacher import prepare_teacher


@dataclass(frozen=True)
class Teacher:
    """The search's teacher, prepared once: the model, its architecture, the evaluation data and its accuracy."""
    model: Any  # torch.nn.Module in eval mode on the CPU
    arch: str
    data: Any  # trainable.tasks.EvalData
    accuracy: dict[str, float | None]  # teacher_val_acc, teacher_test_acc (None: the task has no labels)
    fingerprint: str


def prepare_teacher_for(plan: SearchPlan) -> Teacher:
    """Train (digits, cached) or load the teacher, load the evaluation data, and check a resume's teacher."""
    cfg = build_config(plan.trial_config, task=plan.task_spec)
    batch = largest_batch(plan, cfg.batch_size)
    model, info = prepare_teacher(plan.task_spec, cfg.teacher, plan.teacher_path, plan.seed, plan.data_root, batch_size=batch)
    check_students(plan, cfg.student, batch)
    with data_free():
        data = load_eval_data(plan.task_spec, plan.seed, cfg.val_fraction, plan.data_root, plan.download)
    teacher = Teacher(model, info["arch"], data, teacher_metrics(model, data), fingerprint(model))
    recorded = (plan.record or {}).get("teacher_fingerprint")
    if recorded not in (None, teacher.fingerprint):
        raise UserError(f"the teacher differs from the one search {plan.name!r} started with; pass the same --teacher")
    return teacher


def fit_to_teacher(plan: SearchPlan, teacher: Teacher) -> SearchPlan:
    """The plan with its task's recipe fitted to the teacher (``trainable.fitting``), said in one line; every trial,
    the estimate and the checks below build their configs on it."""
    fitted = fit_task(plan.task_spec, teacher.model, teacher.arch)
    print(fitted.line, flush=True)
    return dataclasses.replace(plan, space=dataclasses.replace(plan.space, task_spec=fitted.task))


def largest_batch(plan: SearchPlan, fixed: int) -> int:
    """The largest batch a trial of the search trains on: the config's, or the top of a searched ``batch_size``."""
    searched = [p for p in plan.space.params if p.name == "batch_size"]
    if not searched:
        return fixed
    p = searched[0]
    values = [v for v in (*p.choices, p.value, p.high) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return int(max(values, default=fixed))


def check_students(plan: SearchPlan, fixed: str, batch_size: int) -> None:
    """Every foreign student the search can train (the config's, or each choice of a searched ``student``) runs as
    a trial runs it (``trainable.sources.check_student``): refused here, in one line, before Ray starts."""
    task = plan.task_spec
    specs = {fixed} | {c for p in plan.space.params if p.name == "student" for c in p.choices}
    for spec in sorted(s for s in specs if isinstance(s, str)):
        check_student(spec, task.num_classes, task.channels, task.image_size, batch_size)


def budget_check(plan: SearchPlan, teacher: Teacher):
    """The ``BudgetCheck`` of a new search's space and teacher; first refuse (exit 2) a space in which no setting
    fits the budget."""
    check = BudgetCheck(dict(plan.trial_config), count_params(teacher.model), dict(plan.space.limits), plan.task_spec)
    check_reachable(plan.space.params, check, plan.seed)
    return check


def typical_trial_config(plan: SearchPlan):
    """The config of a typical trial of the search (``search.space.typical_config``): the one the door check builds
    and the speed measurement times."""
    return typical_config(plan.trial_config, plan.space.params, plan.task_spec)


def check_trial_builds(plan: SearchPlan, teacher: Teacher, cfg) -> None:
    """One run of the typical trial's config ``cfg`` is built here, on the CPU, before Ray starts: a setting that
    cannot make a run (an AVKD prior folder without images, feature widths that need the projection switched off,
    ...) is refused in one line instead of erroring in every trial."""
    with data_free():
        AKDRun(cfg, copy.deepcopy(teacher.model), teacher.data, torch.device("cpu"), data_root=plan.data_root)


def choose_trial_speed(plan: SearchPlan, teacher: Teacher, cfg):
    """The precision and layout every trial computes in (``trainable.speed``): measured once here, on the driver
    before Ray starts, with a trial's threads on a trial's device, for the typical trial's config ``cfg`` (cached
    per machine and models). A resumed search keeps the choice it started with."""
    if plan.record is not None and plan.record.get("speed"):
        return Speed.from_record({**plan.record["speed"], "source": "as the search started"})
    with torch_threads(trial_threads(plan)):
        return choose_speed(cfg, teacher.model, teacher.data, trial_device(plan), data_root=plan.data_root)
