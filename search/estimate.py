"""What a search will cost on this machine, before it runs: ``run_search.py --estimate``.

The smallest and the largest student the space trains (the largest within its budget: larger ones
are refused before training) each run a few full AKD iterations at the precision the search would
use, with a trial's threads; an epoch is its iterations plus one evaluation. The search's wall time
follows from the rungs (``expected_epochs``: asynchronous successive halving promotes early arrivals
more often than one in ``reduction_factor``), the number of trials running at once, and the
confirmation runs. The same arithmetic on the speed measurement's own timing gives every search
an estimate for free, recorded beside its real wall time in ``akdtune/search.json``.

Example::

    python search/run_search.py --space spaces/capacity.yaml --estimate
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from base import metrics as M
from search.cluster import trial_device, trial_threads, trials_at_once
from search.plan import SearchPlan
from search.scheduler import expected_epochs, milestones
from search.space import middle_setting
from trainable.config import build_config
from trainable.evaluation import evaluate
from trainable.measure import duration, one_line_failure, time_candidates
from trainable.models import build_classifier, count_params
from trainable.proxy import agreement_selected, classes_of, generator_images
from trainable.sizing import student_costs, student_width
from trainable.speed import machine_description, torch_threads
from trainable.tasks import data_free

SIZE_KNOBS = ("student_fraction", "student_width")  # searched numbers that set the student's size
STARTUP_S = 10.0  # Ray's start and the first trial's process, measured on the development machines (8-12 s)


@dataclass(frozen=True)
class Student:
    label: str  # "smallest" | "largest" | "typical"
    setting: dict[str, Any]  # the searched values that make it
    param_ratio: float
    iteration_s: float
    epoch_s: float
    peak_bytes: int  # CUDA: max allocated; CPU: the process's peak resident memory


def wall_seconds(plan: SearchPlan, epoch_s: float, at_once: int) -> dict[str, float]:
    """The search's phases in seconds for a trial epoch of ``epoch_s``: search, confirmation, start-up, total."""
    rungs = milestones(plan.grace_period, plan.reduction_factor, plan.max_epochs) if plan.early_stopping else []
    per_trial = expected_epochs(plan.max_epochs, rungs, plan.reduction_factor, plan.num_samples)
    search = plan.num_samples * per_trial * epoch_s / min(at_once, plan.num_samples)
    runs = plan.confirm_top_k * max(0, plan.confirm_seeds - 1)  # each candidate's own seed has mostly run already
    confirm = math.ceil(runs / at_once) * plan.max_epochs * epoch_s if runs else 0.0
    return {"epochs_per_trial": per_trial, "search_s": search, "confirm_s": confirm, "startup_s": STARTUP_S,
            "total_s": search + confirm + STARTUP_S}


def from_speed(plan: SearchPlan, speed) -> float | None:
    """The whole search's expected seconds from the speed measurement's own timing of a typical trial (free: no
    extra measurement); None where nothing was measured (precision and layout both set)."""
    seconds = speed.seconds.get(speed.name)
    if not seconds:
        return None
    cfg = build_config(plan.trial_config, task=plan.task_spec)
    return wall_seconds(plan, seconds * cfg.iters_per_epoch, trials_at_once(plan))["total_s"]


def _size_param(plan: SearchPlan):
    return next((p for p in plan.space.params if p.name in SIZE_KNOBS and p.type in ("float", "int")), None)


def extremes(plan: SearchPlan, check) -> list[tuple[str, dict[str, Any]]]:
    """(label, searched values) of the smallest student and the largest within the budget (a typical setting
    where the space does not search the size)."""
    middle = middle_setting(plan.space.params)
    knob = _size_param(plan)
    students = next((p for p in plan.space.params if p.name == "student" and p.type == "categorical"), None)
    if students is not None:  # sized by name: the choices within the budget, by their size
        sized = []
        for c in students.choices:
            costs = check.costs({**middle, "student": c}) if check is not None else None
            if costs is not None and (check is None or check.reason(costs) is None):
                sized.append((costs.get(M.PARAM_RATIO, 0.0), c))
        if sized:
            sized.sort()
            return [("smallest", {**middle, "student": sized[0][1]}), ("largest", {**middle, "student": sized[-1][1]})]
    if knob is None:
        return [("typical", middle)]
    low, high = {**middle, knob.name: knob.low}, {**middle, knob.name: knob.high}
    if check is not None and check.active and check.over(high):
        lo, hi = float(knob.low), float(knob.high)  # bisect for the largest size within the budget
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if not check.over({**middle, knob.name: mid}) else (lo, mid)
        high = {**middle, knob.name: lo}
    return [("smallest", low), ("largest", high)]


def measure(plan: SearchPlan, teacher, speed, check) -> list[Student]:
    """Time each extreme student's iterations (and one evaluation) at the search's precision and layout, with a
    trial's threads on a trial's device."""
    device, task, teacher_params = trial_device(plan), plan.task_spec, count_params(teacher.model)
    out = []
    with torch_threads(trial_threads(plan)):
        for label, setting in extremes(plan, check):
            cfg = build_config({**plan.trial_config, **setting}, task=plan.task_spec)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            it = time_candidates(cfg, teacher.model, teacher.data, device, [(speed.precision, speed.channels_last)],
                                 rounds=2, data_root=plan.data_root, log=None)[speed.name]
            with one_line_failure(cfg, f"while the estimate times its evaluation ({label} student)"):
                student = build_classifier(cfg.student, task.num_classes, task.channels, task.image_size,
                                           student_width(cfg, teacher_params)).to(device)
                start = time.perf_counter()
                if teacher.data.labelled:
                    evaluate(student, teacher.data.val_x, teacher.data.val_y, cfg.eval_batch_size, device)
                if agreement_selected(cfg.selection, task):  # a generator proxy's validation half
                    classes_of(student, generator_images(task.name, cfg.proxy_images), device, cfg.eval_batch_size)
                eval_s = time.perf_counter() - start
            peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
            out.append(Student(label, setting, student_costs(cfg, teacher_params)[M.PARAM_RATIO], it,
                               it * cfg.iters_per_epoch + eval_s, int(peak)))
    return out


def estimate(plan: SearchPlan, teacher, speed, check) -> dict[str, Any]:
    """Measure and print the estimate of a new search; returns it as plain data."""
    device = trial_device(plan)
    print(f"timing the smallest and the largest student's iterations at {speed.name} (a few seconds each)", flush=True)
    with data_free():
        students = measure(plan, teacher, speed, check)
    at_once = trials_at_once(plan)
    epoch_s = sum(s.epoch_s for s in students) / len(students)  # a trial's size is anywhere between the two
    w = wall_seconds(plan, epoch_s, at_once)
    with torch_threads(trial_threads(plan)):
        machine = machine_description(device)
    print(f"estimate for {plan.space.path} on {machine}; {speed.name}; {at_once} trial(s) at once")
    for s in students:
        print(f"  {s.label} student ({s.param_ratio:.1%} of the teacher's parameters): {1000 * s.iteration_s:.0f} ms per "
              f"iteration, {s.epoch_s:.1f} s per epoch, peak memory {s.peak_bytes / 2 ** 30:.2f} GiB")
    print(f"  a trial: {w['epochs_per_trial']:.1f} epochs on average under the rungs (of {plan.max_epochs}), about "
          f"{duration(w['epochs_per_trial'] * epoch_s)}")
    print(f"  the search: {plan.num_samples} trials, {at_once} at a time: about {duration(w['search_s'])}; the "
          f"confirmation: about {duration(w['confirm_s'])}; start-up about {duration(w['startup_s'])}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = max(s.peak_bytes for s in students)
        fit = int(total // max(peak, 1))
        print(f"  GPU memory: the largest student's trial peaks at {peak / 2 ** 30:.2f} GiB of {total / 2 ** 30:.0f} GiB: "
              f"{fit} such trials fit on one GPU at once (--gpus-per-trial {1 / max(1, fit):.2g})")
    print(f"expected wall time of the whole search: about {duration(w['total_s'])}")
    return {**w, "trials_at_once": at_once, "students": [s.__dict__ for s in students], "machine": machine}
