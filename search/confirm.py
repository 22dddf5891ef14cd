"""A fully trained, confirmed winner: finish the top candidates to max_epochs and re-run them with extra seeds.

After the search, the ``top_k`` best trials within the budget (by their last value of the selection metric,
val_acc, or val_agreement in a search without labels) become
candidates. Each is run with ``seeds`` seeds to the full ``max_epochs``: its own seed continues the
search trial from its last checkpoint when the scheduler stopped it early (nothing is re-run when
it already completed), and every extra seed is a fresh run. These runs are Ray trials of their own
experiment (``<search>/confirm/``: same trainable and resources, resumable like the search,
counted apart from its N trials). The winner is the candidate with the highest mean of the selection metric
over its seeds; each candidate's held-out test accuracy (test agreement without labels) is reported as mean and
std over the seeds.

With ``top_k = 0`` the confirmation is off, but the best trial is still finished to max_epochs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from base import metrics as M
from base.layout import CONFIRM_DIR, CONFIRM_PLAN
from results.recordfile import read_record, write_record
from results.summary import SUCCEEDED, Experiment
from trainable.tune_trainable import CANDIDATE, CONTINUE_FROM

SEED_STRIDE = 1000  # extra seeds: seed + 1000, seed + 2000, ...


def candidates(e: Experiment, top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` (at least 1) best succeeded trials within the budget, best first; [] if none."""
    t, col = e.trials, e.selected
    ok = t[t["outcome"].isin(SUCCEEDED) & t[col].notna()]
    acc = pd.to_numeric(ok[col], errors="coerce")
    ok = ok[acc.notna() & acc.abs().ne(float("inf"))]
    feasible = ok[ok["within_budget"]]
    pool = feasible if len(feasible) else ok
    pool = pool.sort_values([col, "epochs_run", M.PARAM_RATIO], ascending=[False, False, True], kind="stable")
    return [r.to_dict() for _, r in pool.head(max(1, top_k)).iterrows()]


def confirmation_plan(e: Experiment, configs: dict[str, dict], top_k: int, seeds: int, max_epochs: int,
         checkpoint_of) -> dict[str, Any]:
    """The confirmation plan: candidates, and the runs (config, seed, start) still needed for each.

    Args:
        configs: trial id -> its full Tune config.
        checkpoint_of: trial folder -> path of its latest checkpoint (or None).

    Paths in the plan (``trial_dir``, ``continue_from``) are relative to the search folder.
    """
    seeds = max(1, seeds) if top_k > 0 else 1
    out = {"top_k": top_k, "seeds": seeds, "max_epochs": max_epochs, "candidates": [], "runs": []}
    for c in candidates(e, top_k):
        tid = c["trial_id"]
        config = dict(configs[tid])
        base_seed = int(config.get("seed", 0))
        cand_seeds = [base_seed + SEED_STRIDE * i for i in range(seeds)]
        out["candidates"].append({"trial_id": tid, "seeds": cand_seeds, "trial_dir": _inside(c["_dir"], e.path),
                                  "epochs_run": int(c["epochs_run"]), f"search_{e.selection}": float(c[e.selected]),
                                  "within_budget": bool(c["within_budget"])})
        for s in cand_seeds:
            if s == base_seed and int(c["epochs_run"]) >= max_epochs:
                continue  # the search trial itself is the full run of this seed
            run = {**config, "seed": s, CANDIDATE: tid}
            if s == base_seed:
                ckpt = checkpoint_of(c["_dir"])
                if ckpt is not None:
                    run[CONTINUE_FROM] = _inside(ckpt, e.path)
            out["runs"].append(run)
    return out


def _inside(path, folder) -> str:
    """A path of the search folder as the records hold it: relative to the folder, which may be copied or moved."""
    return os.path.relpath(path, folder)


def load_or_write_plan(exp: Path, make) -> dict[str, Any]:
    """The plan of this search's confirmation, made once and kept (a resumed search reuses it)."""
    existing = read_record(exp / CONFIRM_PLAN)
    if existing is not None:
        return existing
    p = make()
    write_record(exp / CONFIRM_PLAN, p)
    return p


def confirm_dir(exp: Path) -> Path:
    return exp / CONFIRM_DIR


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, std


def choose_winner(results: list[dict[str, Any]], selection: str = M.VAL_ACC) -> dict[str, Any] | None:
    """The candidate with the highest mean of the ``selection`` metric over its seeds (ties: smaller student)."""
    done = [r for r in results if r["runs"]]
    if not done:
        return None
    return sorted(done, key=lambda r: (-r[f"{selection}_mean"], r[M.PARAM_RATIO]))[0]


def summarise_candidate(cand: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One candidate's confirmation: per-seed accuracies (agreements) and their mean and std, for each measured."""
    runs = sorted(runs, key=lambda r: r["seed"])
    out = {"trial_id": cand["trial_id"], "runs": runs, "seeds": [r["seed"] for r in runs],
           "epochs": min((r["epochs"] for r in runs), default=0), M.PARAM_RATIO: runs[0][M.PARAM_RATIO] if runs else None,
           M.STUDENT_PARAMS: runs[0][M.STUDENT_PARAMS] if runs else None, "within_budget": cand["within_budget"]}
    for key in (M.VAL_ACC, M.TEST_ACC, M.VAL_AGREEMENT, M.TEST_AGREEMENT):
        if runs and all(r.get(key) is not None for r in runs):
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std([float(r[key]) for r in runs])
    return out
