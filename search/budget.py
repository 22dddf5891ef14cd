"""A space's budget checked before training: a setting over it is refused, never trained.

A space's limits bound the student's size (``limits.param_ratio``: parameters as a share of the teacher's)
and its compute (``limits.flops``: FLOPs per image). Both follow from the configuration alone, so
``BudgetCheck`` works them out on the meta device in milliseconds, exactly as the run would report
them (``trainable.sizing.student_costs``). The searcher asks it about every setting Optuna proposes:
one over the budget is pruned before its first step, with its constraint values (so TPE learns
where the budget ends) and the user attribute ``over_budget`` (what it would have cost), and
another is asked for. So all of the search's trials are spent within the budget, where its answer
lies. The rung scheduler's feasibility-first ranking stays as a second
line for anything trained over a limit anyway.

``check_reachable`` runs once before a search starts: a space in which no drawn setting fits the
budget is refused in one line (exit 2) instead of searching for nothing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from base import metrics as M
from base.errors import UserError
from results.limits import describe_limits, within_limits
from search.space import DefineByRun, Param
from trainable.config import ConfigError, build_config
from trainable.sizing import student_costs

CHECKED = (M.PARAM_RATIO, M.FLOPS)  # the limits a configuration decides before training
MAX_REFUSALS = 100  # refusals in a row after which a setting is trained anyway (ranked after those within)


@dataclass(frozen=True)
class BudgetCheck:
    """Works out a proposed setting's costs and says whether it fits the budget.

    Args:
        base: the trial configuration the searched values are laid over (the plan's ``trial_config``).
        teacher_params: the teacher's parameter count (``param_ratio``'s denominator).
        limits: the space's budget {metric: upper limit}; only ``param_ratio`` and ``flops`` are checked here.
        task: the search's task, resolved once (``SearchPlan.task_spec``); None: resolved from ``base``.
    """
    base: dict[str, Any]
    teacher_params: int
    limits: dict[str, float] = field(default_factory=dict)
    task: Any = None

    @property
    def active(self) -> bool:
        return any(m in self.limits for m in CHECKED)

    def costs(self, suggested: dict[str, Any]) -> dict[str, float] | None:
        """``param_ratio`` and ``flops`` of the setting; None when its configuration is invalid (the trial
        then fails with the configuration's own message)."""
        try:
            return student_costs(build_config({**self.base, **suggested}, task=self.task), self.teacher_params)
        except (ConfigError, ValueError, KeyError):
            return None

    def over(self, suggested: dict[str, Any]) -> str | None:
        """Why the setting is over the budget, in words, or None when it fits (or cannot be judged here)."""
        return self.reason(self.costs(suggested) if self.active else None)

    def reason(self, costs: dict[str, float] | None) -> str | None:
        """Why these costs are over the budget, in words, or None when they fit (or are unknown)."""
        if costs is None:
            return None
        checked = {m: lim for m, lim in self.limits.items() if m in CHECKED}
        if within_limits(costs, checked):
            return None
        return ", ".join(_word(m, costs[m]) for m in checked) + f", over the budget of {describe_limits(checked)}"


def _word(metric: str, value: float) -> str:
    return f"params {value:.1%} of the teacher" if metric == M.PARAM_RATIO else f"{metric} {value:,.0f}"


def check_reachable(params: Sequence[Param], check: BudgetCheck, seed: int, draws: int = 30) -> None:
    """Raise ``UserError`` when none of ``draws`` settings drawn at random from the space fits the budget.

    Stops at the first setting that fits (usually the first), so a sound space costs one check."""
    if not check.active:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line in the search's output
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    smallest: tuple[float, str] = (math.inf, "")
    for _ in range(draws):
        trial = study.ask()
        fixed = DefineByRun(params)(trial)
        setting = {**trial.params, **fixed}
        costs = check.costs(setting)
        reason = check.reason(costs)
        study.tell(trial, 0.0)
        if reason is None:
            return
        size = (costs or {}).get(M.PARAM_RATIO, math.inf)
        if size < smallest[0]:
            smallest = (size, reason)
    raise UserError(f"none of {draws} settings drawn from the space fits its budget (the smallest drawn: {smallest[1]}); "
                    "lower the size range (e.g. student_fraction's low) or raise the budget")
