"""The search's limits on the student (a space's budget) and Pareto dominance: what a search decides with
(``search/``: the budget check, the rung scheduler) and what its tables are marked with (``results/``: within the
budget, on the front). Here, below both, so that a finished search is summarised where ``search/`` (and Ray) cannot
be imported; the run folder's files are named in ``base.layout``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from base import metrics as M
from results.journal import open_study

# ---------------------------------------------------------------------------------------------
# Limits (the space's budget on the student) and the settings refused over them
# ---------------------------------------------------------------------------------------------
OVER_BUDGET = "over_budget"  # Optuna user attribute of a setting refused before training: why, in words
# A repeatable search's refused setting: the proposal it was drawn for and its try (a resume may draw it again)
PROPOSAL, ATTEMPT = "proposal", "attempt"


def space_limits(raw: dict[str, Any]) -> dict[str, float]:
    """A space's limits on the student as ``{metric: upper limit}``, from its ``limits: {param_ratio, flops}`` (or the
    older ``param_budget`` and ``budget.flops``). A trial is within the budget when every limit holds."""
    block = raw.get("limits") if isinstance(raw.get("limits"), dict) else {}
    old = raw.get("budget") if isinstance(raw.get("budget"), dict) else {}
    ratio = raw.get("param_budget", block.get(M.PARAM_RATIO))
    flops = old.get(M.FLOPS, block.get(M.FLOPS))
    return {m: float(v) for m, v in ((M.PARAM_RATIO, ratio), (M.FLOPS, flops)) if v is not None}


def describe_limits(limits: dict[str, float]) -> str:
    """The budget in words, e.g. "params <= 10% of the teacher, flops <= 400,000"; "" for none."""
    return ", ".join(f"params <= {v:.0%} of the teacher" if m == M.PARAM_RATIO else f"{m} <= {v:,.0f}"
                     for m, v in limits.items())


def within_limits(result: dict[str, Any], limits: dict[str, float]) -> bool:
    """Every limit holds (a metric the result lacks counts as over)."""
    return all(result.get(m) is not None and result[m] <= lim for m, lim in limits.items())


def count_refused(study) -> int:
    """How many proposed settings an Optuna study's search refused before training, over its budget; one drawn again
    for the same proposal and try (a resume drawing the proposal a kill cut short) counts once, as in a search
    that was never interrupted."""
    if study is None:
        return 0
    refused = [t for t in study.get_trials(deepcopy=False) if OVER_BUDGET in t.user_attrs]
    return len({(t.user_attrs[PROPOSAL], t.user_attrs.get(ATTEMPT, 0)) if PROPOSAL in t.user_attrs else ("n", t.number)
                for t in refused})


def refused_over_budget(path: str | Path) -> int:
    """``count_refused`` of the study in the journal at ``path`` (0 when there is none yet)."""
    return count_refused(open_study(path))


# ---------------------------------------------------------------------------------------------
# Dominance (objective vectors, all minimised)
# ---------------------------------------------------------------------------------------------
def dominates(a, b) -> bool:
    """``a`` dominates ``b`` (all objectives minimised): no worse everywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_mask(acc: list[float], ratio: list[float]) -> list[bool]:
    """True where no other point has higher-or-equal accuracy and lower-or-equal size, one strictly."""
    points = [(-a, r) for a, r in zip(acc, ratio)]
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]
