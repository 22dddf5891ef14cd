"""The search's Optuna study, read from its journal file, and a view of it at one fidelity for plots.

The study itself (``akdtune/study.journal``, Optuna's journal storage) is the record: pruned trials
are PRUNED there with their intermediate values. Optuna's history, parallel-coordinate, slice and
importance plots only draw COMPLETE trials, which after early stopping leaves most trials out, and
mixes nothing up only when every value was measured after the same number of epochs. ``at_fidelity``
therefore builds an in-memory study in which every trial that reached a given epoch is COMPLETE
with its selection metric (val_acc, or val_agreement without labels) *at that epoch* (by default the first
rung: the epoch every trial that did not fail reached), so these plots show every trial at one stated fidelity.
"""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd

from base import metrics as M
from base.layout import STUDY_FILE
from results.journal import RAY_ID, newest_by_ray_id, open_study
from results.limits import OVER_BUDGET
from results.summary import Experiment

optuna.logging.set_verbosity(optuna.logging.WARNING)


def load_study(exp: str | Path) -> optuna.Study | None:
    """The search's study from its journal file (checked: a damaged one raises DamagedRecord), or None when there is
    none."""
    return open_study(Path(exp) / STUDY_FILE)


def newest_records(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials by number, a Ray trial's newest record only (a trial a resume trained again after it
    errored has its FAIL record and the retry's: ``search.searcher.reopen_for_retry``)."""
    newest = {t.number for t in newest_by_ray_id(study).values()}
    return sorted((t for t in study.get_trials(deepcopy=False) if RAY_ID not in t.user_attrs or t.number in newest),
                  key=lambda t: t.number)


def at_fidelity(e: Experiment, study: optuna.Study | None, epoch: int) -> tuple[optuna.Study, int, int]:
    """A single-objective (the selection metric, max) study with one COMPLETE trial per trial that reached ``epoch``.

    Returns (study, trials included, trials left out because they never reached ``epoch``). Settings refused
    before training (over the budget) were never trials of the search: neither included nor left out.
    """
    out = optuna.create_study(direction="maximize")
    if study is None:
        return out, 0, len(e.trials)
    at = {}
    if len(e.epochs):
        sel = e.epochs[e.epochs[M.EPOCH] == epoch]
        at = {tid: v for tid, v in zip(sel["trial_id"], sel[e.selection]) if v is not None and not pd.isna(v)}
    included, left_out, trials = [], 0, set(e.trials["trial_id"])
    for t in newest_records(study):
        if OVER_BUDGET in t.user_attrs:  # never trained: not a trial of the search
            continue
        if t.user_attrs.get(RAY_ID) not in trials:  # a trial whose record Tune lost to a kill (the resumed
            continue  # search ran its setting again) or one asked just before a kill: not a trial of the table
        v = at.get(t.user_attrs.get(RAY_ID))
        if v is None or not math.isfinite(float(v)) or not t.distributions:
            left_out += 1
            continue
        included.append(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, params=t.params, distributions=t.distributions, value=float(v),
            user_attrs={RAY_ID: t.user_attrs.get(RAY_ID), "state": t.state.name}))
    out.add_trials(included)
    return out, len(included), left_out
