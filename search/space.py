"""Search spaces: YAML (data only, ``yaml.safe_load``), validated completely before Ray starts.

A space file::

    description: student size against accuracy
    task: digits                  # optional; --task overrides
    objectives:                   # one or two objectives (TPE); early stopping ranks by them
      - {metric: val_acc, mode: max}
      - {metric: param_ratio, mode: min}
    limits: {param_ratio: 0.10}   # optional: the best trial must have param_ratio <= this
                                  # (flops: 400000: ... and at most this many FLOPs per image, student forward)
    search: {num_samples: 16, max_epochs: 20, grace_period: 4, reduction_factor: 3,
             confirm_top_k: 3, confirm_seeds: 3}   # top 3 re-run to max_epochs with 3 seeds each (0: off)
    fixed: {n_generator: 1}       # config values for every trial
    params:
      student_fraction: {type: float, low: 0.02, high: 0.5, log: true}
      student_loss: {type: categorical, choices: [l1, kl]}
      temperature: {type: float, low: 1, high: 8, when: {student_loss: kl}}   # conditional

Anything not searched or fixed takes the task's default. Every problem is reported in one
``SpaceError`` naming each key. Older spaces name ``search`` ``budget`` and the limits ``param_budget`` and
``budget.flops``; they are read as they meant, with a one-line note.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base import metrics as M
from base.errors import ConfigError, UserError, unknown
from base.yamlfile import read_yaml, short
from results.limits import space_limits
from trainable import sources
from trainable.config import FIELDS, build_config
from trainable.images import as_task_name
from trainable.tasks import Task, resolve_task

TOP_KEYS = {"description", "task", "objective", "objectives", "search", "limits", "fixed", "params", "seed"}
OLD_KEYS = {"param_budget", "budget"}  # the older names of limits.param_ratio and search (budget.flops: limits.flops)
SETTING_KEYS = {"num_samples", "max_epochs", "grace_period", "reduction_factor", "confirm_top_k", "confirm_seeds"}
LIMIT_KEYS = {M.PARAM_RATIO, M.FLOPS}
# The confirmation's settings (the space's search block, and --confirm-top-k / --confirm-seeds): [low, high].
CONFIRM_BOUNDS = {"confirm_top_k": (0, 20), "confirm_seeds": (1, 20)}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
    "fixed": {"type", "value", "when"},
}
# Keys a space may not search: the task is chosen per search, epochs by budget.max_epochs.
NOT_SEARCHABLE = {"task", "epochs"}
METRIC_MODES = ("min", "max")
MODEL_KEYS = ("teacher", "student")  # config keys that name a model, which may be code (package.module:callable)


class SpaceError(UserError):
    """A malformed search space; the message names every bad key."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # float | int | categorical | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    value: Any = None
    when: dict[str, tuple] = field(default_factory=dict)  # parent name -> allowed values

    def corners(self) -> list[Any]:
        """Values that bound what this parameter can take (checked against the config rules)."""
        if self.type in ("float", "int"):
            return [self.low, self.high]
        if self.type == "categorical":
            return list(self.choices)
        return [self.value]


@dataclass(frozen=True)
class Space:
    path: str
    description: str
    task: str | None
    objectives: tuple[tuple[str, str], ...]  # ((metric, mode), ...)
    limits: dict[str, float]  # the student's limits: {param_ratio, flops: upper limit} (see results.limits.space_limits)
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    confirm_top_k: int  # candidates finished to max_epochs and re-run with extra seeds (0: off)
    confirm_seeds: int  # seeds per candidate, its own included
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    seed: int = 0
    raw: dict = field(default_factory=dict, compare=False)
    task_spec: Task | None = field(default=None, compare=False, repr=False)  # ``task`` resolved once, here
    notes: tuple[str, ...] = ()  # what a user should know about the file (older key names), said once

    @property
    def param_budget(self) -> float | None:
        """The limit on ``param_ratio``, if any."""
        return self.limits.get(M.PARAM_RATIO)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_param(name: str, spec: Any, errs: list[str]) -> Param | None:
    where = f"params.{name}"
    if name not in FIELDS:
        errs.append(unknown(f"{where}: unknown hyperparameter", sorted(set(FIELDS) - NOT_SEARCHABLE)))
        return None
    if name in NOT_SEARCHABLE:
        errs.append(f"{where}: cannot be searched (use --task for the task, search.max_epochs for epochs)")
        return None
    if not isinstance(spec, dict):
        errs.append(f"{where}: expected a mapping like {{type: float, low: 0.01, high: 0.1}}, got {short(spec)}")
        return None
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        errs.append(f"{where}.type: expected one of {sorted(PARAM_KEYS)}, got {short(kind)}")
        return None
    for key in sorted(set(spec) - PARAM_KEYS[kind]):
        errs.append(f"{where}.{key}: unknown key for type {kind}; valid: {sorted(PARAM_KEYS[kind])}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        errs.append(f"{where}.when: expected a mapping {{parameter: value or [values]}}, got {short(when)}")
        when = {}
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    if kind in ("float", "int"):
        return _parse_range(name, kind, spec, when, errs)
    if kind == "categorical":
        return _parse_choices(name, spec, when, errs)
    if "value" not in spec:
        errs.append(f"{where}.value: missing; type fixed needs a value")
        return None
    v = spec["value"]
    return Param(name, kind, value=tuple(v) if isinstance(v, list) else v, when=when)


def _parse_range(name: str, kind: str, spec: dict, when: dict, errs: list[str]) -> Param | None:
    """A float or int parameter: low < high, log (low > 0) or step, not both."""
    where, n_before = f"params.{name}", len(errs)
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for key, v in (("low", low), ("high", high)):
        if not _num(v):
            errs.append(f"{where}.{key}: expected a number, got {short(v)}")
        elif kind == "int" and not float(v).is_integer():
            errs.append(f"{where}.{key}: expected an integer for type int, got {short(v)}")
    if not isinstance(log, bool):
        errs.append(f"{where}.log: expected true/false, got {short(log)}")
    if step is not None and (not _num(step) or step <= 0):
        errs.append(f"{where}.step: expected a positive number, got {short(step)}")
    if log and step is not None:
        errs.append(f"{where}: log and step cannot be combined; drop one")
    if len(errs) == n_before:
        if low >= high:
            errs.append(f"{where}: low ({low}) must be < high ({high}); use type: fixed for a single value")
        elif log and low <= 0:
            errs.append(f"{where}: log scale needs low > 0, got {low}")
    if len(errs) > n_before:
        return None
    if kind == "int":
        low, high = int(low), int(high)
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def _parse_choices(name: str, spec: dict, when: dict, errs: list[str]) -> Param | None:
    where, choices = f"params.{name}", spec.get("choices")
    if not isinstance(choices, list) or not choices:
        errs.append(f"{where}.choices: expected a non-empty list, got {short(choices)}")
        return None
    if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
        errs.append(f"{where}.choices: expected plain values (names, numbers, true/false), got {short(choices)}")
        return None
    if len(set(map(repr, choices))) != len(choices):
        errs.append(f"{where}.choices: has repeated values {short(choices)}")
        return None
    return Param(name, "categorical", choices=tuple(choices), when=when)


def _check_against_config(task: Task, fixed: dict, params: list[Param], errs: list[str]) -> None:
    """Each fixed value and each parameter's bounds/choices must make a valid run config."""
    base = {"task": task.name, **fixed}
    try:
        build_config(base, task=task)
    except ConfigError as e:
        errs.append(f"fixed: {str(e).removeprefix('invalid config: ')}")
        return
    for p in params:
        for v in p.corners():
            try:
                build_config({**base, p.name: v}, task=task)
            except ConfigError as e:
                errs.append(f"params.{p.name}: value {short(v)} is invalid ({str(e).removeprefix('invalid config: ')})")
                break


def parse_space(raw: Any, path: str = "<space>", task_override: str | None = None, trust_code: bool = False,
                trusted_specs: frozenset[str] = frozenset()) -> Space:
    """Validate a loaded YAML document. Raises SpaceError naming every problem.

    A model named ``package.module:callable`` is code: a space may name one only with ``trust_code``
    (``--trust-space``) or where the same spec is in ``trusted_specs`` (named on the command line); otherwise it is
    refused before anything is imported."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    errs = [f"{key}: unknown top-level key; valid: {sorted(TOP_KEYS)}" for key in sorted(set(raw) - TOP_KEYS - OLD_KEYS)]
    task = _parse_task(raw, task_override, errs)  # resolved once: the search's every config is built with it
    objectives = _parse_objectives(raw, errs)
    section, settings = _parse_settings(raw, errs)
    limits = _parse_limits(raw, section, errs)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        errs.append(f"seed: expected an integer, got {short(seed)}")
        seed = 0
    fixed = _parse_fixed(raw, errs)
    params = _parse_params(raw, fixed, errs)
    if not trust_code:
        _refuse_untrusted_code(path, fixed, params, trusted_specs)
    if not errs:
        _check_against_config(task, {**fixed, "epochs": settings["max_epochs"]}, params, errs)
    if errs:
        raise SpaceError(f"{path}: " + "; ".join(errs))
    notes = (f"{path} uses the older keys {sorted(set(raw) & OLD_KEYS)}: read as search: (the search's settings) and "
             "limits: (the student's); rename them to keep this note away",) if set(raw) & OLD_KEYS else ()
    return Space(path=path, description=str(raw.get("description", "")), task=task.name, objectives=tuple(objectives),
                 limits=limits, fixed=fixed, params=tuple(params), seed=seed, raw=raw, notes=notes, task_spec=task,
                 **settings)


def _refuse_untrusted_code(path: str, fixed: dict, params: list[Param], trusted_specs: frozenset[str]) -> None:
    """A space that names code to import (``package.module:callable``) not named on the command line: refused,
    before building any config (which would import it)."""
    named = [(f"fixed.{key}", fixed[key]) for key in MODEL_KEYS if key in fixed]
    named += [(f"params.{p.name}", v) for p in params if p.name in MODEL_KEYS for v in (*p.choices, p.value)]
    code = [(where, v) for where, v in named if isinstance(v, str) and sources.kind(v) == "callable"
            and v not in trusted_specs]
    if code:
        where, spec = code[0]
        raise SpaceError(f"{path}: {where} names code to import ({spec!r}); a space file is read as data, so the "
                         "modules it names are imported only when you say so: add --trust-space if you trust this "
                         f"file's author like your own code{f', or pass --teacher-model {spec}' if 'teacher' in where else ''}")


def _parse_task(raw: dict, task_override: str | None, errs: list[str]) -> Task:
    task, problem = resolve_task(as_task_name(task_override or raw.get("task") or "digits"))
    if problem:
        errs.append(problem if len(problem) < 400 else short(problem, 400))
        return resolve_task("digits")[0]
    return task


def _parse_objectives(raw: dict, errs: list[str]) -> list[tuple[str, str]]:
    """One or two {metric, mode}; the first is the selection metric (val_acc, or val_agreement without labels)."""
    if "objective" in raw and "objectives" in raw:
        errs.append("objective: give either objective or objectives, not both")
    objs = raw.get("objectives", [raw["objective"]] if "objective" in raw else [{"metric": M.VAL_ACC, "mode": "max"}])
    if not isinstance(objs, list) or not 1 <= len(objs) <= 2:
        errs.append(f"objectives: expected a list of one or two {{metric, mode}}, got {short(objs)}")
        return []
    objectives = []
    for i, o in enumerate(objs):
        if not isinstance(o, dict) or set(o) != {"metric", "mode"}:
            errs.append(f"objectives[{i}]: expected {{metric: NAME, mode: max|min}}, got {short(o)}")
        elif o["metric"] not in M.EPOCH_METRICS:
            errs.append(unknown(f"objectives[{i}].metric: unknown {short(o['metric'])}", list(M.EPOCH_METRICS)))
        elif o["mode"] not in METRIC_MODES:
            errs.append(f"objectives[{i}].mode: expected max or min, got {short(o['mode'])}")
        else:
            objectives.append((o["metric"], o["mode"]))
    if objectives and objectives[0] not in ((M.VAL_ACC, "max"), (M.VAL_AGREEMENT, "max")):
        errs.append("objectives[0]: must be {metric: val_acc, mode: max} (the selection metric; "
                    "{metric: val_agreement, mode: max} to select without labels)")
    return objectives


def _parse_settings(raw: dict, errs: list[str]) -> tuple[str, dict[str, Any]]:
    """The search's settings (``search:``, or the older ``budget:``), each checked: (the key used, the settings)."""
    if "search" in raw and "budget" in raw:
        errs.append("search: give either search (the older name: budget) or budget, not both")
    section = "budget" if "budget" in raw and "search" not in raw else "search"
    block = raw.get(section, {})
    valid = SETTING_KEYS | ({"flops"} if section == "budget" else set())
    if not isinstance(block, dict):
        errs.append(f"{section}: expected a mapping with {sorted(valid)}, got {short(block)}")
        block = {}
    errs.extend(f"{section}.{key}: unknown key; valid: {sorted(valid)}" for key in sorted(set(block) - valid))
    out: dict[str, Any] = {}
    for key, default, low, high in (("num_samples", 10, 1, None), ("max_epochs", 20, 1, None),
                                    ("grace_period", 3, 1, None), *((k, 3, lo, hi) for k, (lo, hi) in CONFIRM_BOUNDS.items())):
        v = block.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            errs.append(f"{section}.{key}: expected an integer " + (f">= {low}" if high is None else f"in [{low}, {high}]")
                        + f", got {short(v)}")
            v = default
        out[key] = v
    if out["grace_period"] > out["max_epochs"]:
        errs.append(f"{section}.grace_period: ({out['grace_period']}) must be <= {section}.max_epochs "
                    f"({out['max_epochs']})")
    rf = block.get("reduction_factor", 3)
    if not _num(rf) or rf <= 1:
        errs.append(f"{section}.reduction_factor: expected a number > 1, got {short(rf)}")
        rf = 3
    out["reduction_factor"] = float(rf)
    return section, out


def _parse_limits(raw: dict, section: str, errs: list[str]) -> dict[str, float]:
    """The student's limits: ``limits: {param_ratio, flops}`` (or the older ``param_budget`` and ``budget.flops``)."""
    block = raw.get("limits", {})
    if not isinstance(block, dict):
        errs.append(f"limits: expected a mapping with {sorted(LIMIT_KEYS)}, got {short(block)}")
        block = {}
    errs.extend(f"limits.{key}: unknown key; valid: {sorted(LIMIT_KEYS)}" for key in sorted(set(block) - LIMIT_KEYS))
    if "limits" in raw and ("param_budget" in raw or section == "budget" and "flops" in (raw.get("budget") or {})):
        errs.append("limits: give the limits either in limits or in the older param_budget and budget.flops, not both")
    ratio_key = "param_budget" if "param_budget" in raw else "limits.param_ratio"
    ratio = raw.get("param_budget", block.get(M.PARAM_RATIO))
    if ratio is not None and (not _num(ratio) or not 0 < ratio <= 1):
        errs.append(f"{ratio_key}: expected a parameter ratio in (0, 1], got {short(ratio)}")
    old_flops = (raw.get("budget") or {}).get(M.FLOPS) if isinstance(raw.get("budget"), dict) else None
    flops_key = "budget.flops" if old_flops is not None else "limits.flops"
    flops = old_flops if old_flops is not None else block.get(M.FLOPS)
    if flops is not None and (not _num(flops) or flops <= 0):
        errs.append(f"{flops_key}: expected a positive number of FLOPs per image, got {short(flops)}")
    if any(e.startswith(("limits", "param_budget", "budget.flops")) for e in errs):
        return {}
    return space_limits(raw)


def _parse_fixed(raw: dict, errs: list[str]) -> dict[str, Any]:
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        errs.append(f"fixed: expected a mapping of config values, got {short(fixed)}")
        return {}
    errs.extend(f"fixed.{key}: cannot be fixed here (use --task, search.max_epochs)" for key in fixed
                if key in NOT_SEARCHABLE)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in fixed.items() if k not in NOT_SEARCHABLE}


def _parse_params(raw: dict, fixed: dict, errs: list[str]) -> list[Param]:
    """The searched parameters, each checked, and their conditions (``when``) against the ones before them."""
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        errs.append("params: expected a non-empty mapping of hyperparameters to search")
        return []
    params = [p for p in (_parse_param(str(name), spec, errs) for name, spec in params_raw.items()) if p is not None]
    errs.extend(f"fixed.{key}: also searched in params; keep one" for key in fixed if key in {p.name for p in params})
    for i, p in enumerate(params):
        earlier = {q.name: q for q in params[:i]}
        for parent, values in p.when.items():
            if parent not in earlier or earlier[parent].type not in ("categorical", "fixed"):
                errs.append(f"params.{p.name}.when: {short(parent)} must be a categorical parameter listed before it")
                continue
            allowed = earlier[parent].choices if earlier[parent].type == "categorical" else (earlier[parent].value,)
            bad = [v for v in values if v not in allowed]
            if bad:
                errs.append(f"params.{p.name}.when.{parent}: {short(bad)} not among its choices {list(allowed)}")
    return params


MAX_SPACE_BYTES = 256 * 1024  # a space is a few hundred bytes; anything near this is not a space file


def load_space(path: str | Path, task_override: str | None = None, trust_code: bool = False,
               trusted_specs: frozenset[str] = frozenset()) -> Space:
    """Read and validate a space file: data only (``yaml.safe_load``), UTF-8, bounded in size, depth and
    alias expansion, no duplicate keys; code it names refused unless trusted (``parse_space``)."""
    p = Path(path)
    if not p.exists():
        dangling = f" (a link to {os.readlink(p)}, which does not exist)" if p.is_symlink() else ""
        raise SpaceError(f"space file not found: {p}{dangling}; pass --space spaces/NAME.yaml (see spaces/)")
    raw = read_yaml(p, MAX_SPACE_BYTES, "a space file", SpaceError)
    return parse_space(raw, str(p), task_override, trust_code, trusted_specs)


class DefineByRun:
    """Optuna define-by-run function for a space (a class, so Ray can pickle it for restore)."""

    def __init__(self, params: tuple[Param, ...]):
        self.params = params

    def __call__(self, trial) -> dict[str, Any]:
        """Suggest every active parameter; returns the fixed ones (Optuna records the suggested)."""
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for p in self.params:
            if any(chosen.get(parent) not in values for parent, values in p.when.items()):
                continue  # condition not met: the parameter takes its default
            if p.type == "float":
                chosen[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                chosen[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=int(p.step or 1))
            elif p.type == "categorical":
                chosen[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            else:
                chosen[p.name] = fixed[p.name] = p.value
        return fixed


def middle_setting(params: tuple[Param, ...]) -> dict[str, Any]:
    """A setting in the middle of the space: the geometric middle of a log range, the arithmetic middle of a
    linear one, the first of the choices; a parameter whose condition is not met is left out. What the
    search's speed measurement times as its typical trial."""
    chosen: dict[str, Any] = {}
    for p in params:
        if any(chosen.get(parent) not in values for parent, values in p.when.items()):
            continue
        if p.type in ("float", "int"):
            mid = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
            chosen[p.name] = int(round(mid)) if p.type == "int" else mid
        elif p.type == "categorical":
            chosen[p.name] = p.choices[0]
        else:
            chosen[p.name] = p.value
    return chosen


def typical_config(base: dict[str, Any], params: tuple[Param, ...], task: Task | None = None):
    """The config of a typical trial: ``base`` with the middle setting laid over it, or ``base`` alone where the
    middles of the ranges are not a valid combination (the fixed settings are). ``task``: resolved already."""
    try:
        return build_config({**base, **middle_setting(params)}, task=task)
    except ConfigError:
        return build_config(base, task=task)


def limit_violation(result: dict[str, Any], limits: dict[str, float]) -> float:
    """How far over its limits a result is, 0 within them: param_ratio above its budget (a share of the teacher)
    plus the relative excess of the other metrics (e.g. flops / limit - 1)."""
    total = 0.0
    for m, lim in limits.items():
        v = result.get(m)
        if v is None:
            continue
        total += max(0.0, float(v) - lim) if m == M.PARAM_RATIO else max(0.0, float(v) / lim - 1.0)
    return total
