"""Rebuild Optuna studies from an experiment's tables, so Optuna's own plots can draw it.

The study is rebuilt from what the experiment recorded (the trials and epochs tables and the space),
not unpickled: ``val_acc`` per epoch becomes each trial's intermediate values, ASHA-stopped trials
are PRUNED, errored trials FAIL, unfinished ones RUNNING.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
import pandas as pd

from results.summary import COMPLETED, ERRORED, STOPPED_EARLY, Experiment
from trainable import metrics as M

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distributions(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a space's searched parameters (fixed ones are left out)."""
    out = {}
    for name, spec in (space.get("params") or {}).items():
        kind = spec.get("type")
        if kind == "float":
            out[name] = optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=bool(spec.get("log")),
                                                               step=spec.get("step"))
        elif kind == "int":
            out[name] = optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]),
                                                             log=bool(spec.get("log")), step=int(spec.get("step") or 1))
        elif kind == "categorical":
            out[name] = optuna.distributions.CategoricalDistribution(spec["choices"])
    return out


def _params(row: pd.Series, dists: dict) -> tuple[dict, dict]:
    params, used = {}, {}
    for name, dist in dists.items():
        v = row.get(f"param.{name}")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue  # a conditional parameter that was not active
        if isinstance(dist, optuna.distributions.IntDistribution):
            v = int(v)
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            v = float(v)
        elif isinstance(dist, optuna.distributions.CategoricalDistribution):
            v = next((c for c in dist.choices if c == v or str(c) == str(v)), None)
            if v is None:
                continue
        params[name], used[name] = v, dist
    return params, used


def rebuild_study(e: Experiment, objectives: tuple[tuple[str, str], ...] = ((M.VAL_ACC, "max"),)) -> optuna.Study:
    """A study over ``objectives`` (metric, mode) with one trial per experiment trial."""
    dists = distributions(e.meta.get("space") or {})
    directions = ["maximize" if mode == "max" else "minimize" for _, mode in objectives]
    study = optuna.create_study(directions=directions) if len(directions) > 1 else \
        optuna.create_study(direction=directions[0])
    curves = {tid: g for tid, g in e.epochs.groupby("trial_id")} if len(e.epochs) else {}
    trials = []
    for _, row in e.trials.iterrows():
        params, used = _params(row, dists)
        curve = curves.get(row["trial_id"])
        inter = {} if curve is None else {int(ep): float(v) for ep, v in zip(curve[M.EPOCH], curve[M.VAL_ACC])
                                          if v is not None and not math.isnan(v)}
        outcome = row["outcome"]
        final = {M.VAL_ACC: row.get("final_val_acc"), M.PARAM_RATIO: row.get("param_ratio")}
        values = [final.get(m) for m, _ in objectives]
        if outcome == COMPLETED and all(v is not None and not math.isnan(v) for v in values):
            state, vals = optuna.trial.TrialState.COMPLETE, values
        elif outcome == STOPPED_EARLY:
            state, vals = optuna.trial.TrialState.PRUNED, None
        elif outcome == ERRORED:
            state, vals = optuna.trial.TrialState.FAIL, None
        else:
            state, vals = optuna.trial.TrialState.RUNNING, None
        trials.append(optuna.trial.create_trial(
            state=state, params=params, distributions=used, values=vals,
            intermediate_values=inter if len(objectives) == 1 else None,
            user_attrs={"ray_trial_id": row["trial_id"], "outcome": outcome}))
    study.add_trials(trials)
    return study
