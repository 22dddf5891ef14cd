"""Read a Ray experiment folder (finished, interrupted or resumed) into two tidy tables.

``trials`` — one row per trial (columns documented in ``TRIAL_COLUMNS``), ``epochs`` — one row per
trial per reported epoch (every metric of ``trainable.metrics.EPOCH_METRICS``). Rows that a resume
reports twice (an epoch re-run from a checkpoint) are deduplicated, keeping the latest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from results.record import (
    BEST_DIR,
    CONFIRM_RESULTS,
    META_FILE,
    SCHEDULER_FILE,
    SUMMARY_DIR,
    check_records,
    read_record,
    scheduler_record,
)
from search.space import budget_limits, within_limits
from trainable import metrics as M
from trainable.files import atomic_path, read_json

# Outcomes of a trial.
COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED, UNFINISHED, ABANDONED = (
    "completed", "stopped_early", "diverged", "errored", "unfinished", "abandoned")

TRIAL_COLUMNS = {
    "trial_id": "Ray's trial id",
    "outcome": f"{COMPLETED} | {STOPPED_EARLY} (by the scheduler) | {DIVERGED} (NaN/Inf loss) | {ERRORED} | "
               f"{UNFINISHED} (interrupted, resumable) | {ABANDONED} (a folder the driver created just before it "
               "was killed, unknown to Tune; the resumed search ran another trial in its place)",
    "error": "the reason of a diverged or errored trial, else empty",
    "stopped_at": "the rung (epoch) where the scheduler stopped the trial, with its position (e.g. 5: 4 of 7)",
    "param.<name>": "one typed column per searched hyperparameter (null where a condition left it unset)",
    "final_val_acc": "val_acc at the last reported epoch (the selection metric where the task has labels)",
    "best_val_acc": "highest val_acc over the trial's epochs",
    "final_val_agreement": "val_agreement (agreement with the teacher on held-out unlabelled images) at the last "
                           "reported epoch: the selection metric of a search without labels, else empty",
    "best_val_agreement": "highest val_agreement over the trial's epochs",
    "final_val_loss": "val_loss at the last reported epoch",
    "epochs_run": "epochs reported",
    "student_params": "student parameter count",
    "teacher_params": "teacher parameter count",
    "param_ratio": "student_params / teacher_params",
    "flops": "the student's floating-point operations per image (one forward; a multiply-add counts 2)",
    "latency_ms_b1": "the winner only: median CPU milliseconds per image at batch 1 (best/student.pt2's model)",
    "throughput_b256": "the winner only: median CPU images per second at batch 256",
    "size_bytes": "the winner only: size of best/student.pt2",
    "cpu_threads": "the winner only: torch CPU threads during that timing",
    "within_budget": "param_ratio <= the space's param_budget and flops <= its budget.flops (true when it has none)",
    "pareto": "on the selection-metric-versus-size Pareto front (max final_val_acc or final_val_agreement, min "
              "param_ratio)",
    "wall_s": "seconds the trial ran (summed over resumes)",
    "confirmed_seeds": "confirmation candidates: the seeds each was run with to max_epochs (else empty)",
    "confirmed_val_acc_mean": "confirmation candidates: mean val_acc over those seeds",
    "confirmed_val_acc_std": "confirmation candidates: its standard deviation",
    "confirmed_test_acc_mean": "confirmation candidates: mean held-out test_acc over those seeds",
    "confirmed_test_acc_std": "confirmation candidates: its standard deviation",
    "confirmed_val_agreement_mean": "confirmation candidates (selection on agreement): mean val_agreement",
    "confirmed_val_agreement_std": "confirmation candidates: its standard deviation",
    "confirmed_test_agreement_mean": "confirmation candidates (selection on agreement): mean test_agreement",
    "confirmed_test_agreement_std": "confirmation candidates: its standard deviation",
    "winner": "the confirmed winner (the student in best/)",
}


@dataclass
class Experiment:
    path: Path
    meta: dict[str, Any]
    stopped: dict[str, dict[str, Any]]  # the scheduler's stop decisions by trial id (results.record.stop_decisions)
    confirmed: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def param_budget(self) -> float | None:
        return (self.meta.get("space") or {}).get("param_budget")

    @property
    def selection(self) -> str:
        """The metric the search selected on: ``val_acc`` or ``val_agreement`` (a search without labels)."""
        return self.meta.get(M.SELECTED_ON) or M.VAL_ACC

    @property
    def selected(self) -> str:
        """The trials table's column of the selection metric at each trial's last epoch."""
        return f"final_{self.selection}"

    @property
    def labelled(self) -> bool:
        """Whether accuracies were measured (the task has labels)."""
        return self.meta.get(M.TEACHER_VAL_ACC) is not None or self.selection == M.VAL_ACC

    @property
    def partial(self) -> bool:
        counted = int((self.trials["outcome"] != ABANDONED).sum())
        return bool((self.trials["outcome"] == UNFINISHED).any()) or counted < self.meta.get("num_samples", 0)


def _trial_records(exp: Path) -> list[dict[str, Any]]:
    """(trial_id, status, config, trial folder) of every trial, from Tune's latest experiment state."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp))
    return [{"trial_id": t.trial_id, "status": t.status, "config": dict(t.config), "dir": Path(t.path)}
            for t in analysis.trials]


def _outcome(status: str, stopped: dict | None, last: dict, errored: bool = False) -> str:
    if status == "ABANDONED":
        return ABANDONED
    if status == "ERROR" or (errored and status != "TERMINATED"):  # errored: the scheduler saw it fail for good
        return ERRORED
    if last.get(M.DIVERGED) or (stopped or {}).get("reason") == "diverged":
        return DIVERGED
    if stopped:
        return STOPPED_EARLY
    if status != "TERMINATED":
        return UNFINISHED
    return COMPLETED


def _error_line(trial_dir: Path) -> str:
    """The reason a trial errored, in one line: the last line of its traceback (the exception and its message)."""
    path = trial_dir / "error.txt"
    text = path.read_text(errors="replace") if path.exists() else ""
    if "ActorDiedError" in text or "worker process has died" in text:
        return ("the worker died (killed, out of memory, or crashed outside Python); its traceback is in "
                f"{path.name}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "error"


def pareto_mask(acc: list[float], ratio: list[float]) -> list[bool]:
    """True where no other point has higher-or-equal accuracy and lower-or-equal size, one strictly."""
    out = []
    for i, (a, r) in enumerate(zip(acc, ratio)):
        dominated = any((a2 >= a and r2 <= r) and (a2 > a or r2 < r) for j, (a2, r2) in enumerate(zip(acc, ratio)) if j != i)
        out.append(not dominated)
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder into an ``Experiment`` (tables built in memory, nothing written)."""
    exp = Path(path)
    if not exp.is_dir():
        from trainable.errors import UserError

        raise UserError(f"experiment folder not found: {exp}; pass <storage>/<name> of a search")
    if not list(exp.glob("experiment_state-*.json")):
        from trainable.errors import UserError

        raise UserError(f"{exp} is not a Ray experiment folder (no experiment_state-*.json); "
                        "pass <storage>/<name> of a search")
    damaged = check_records(exp)  # before anything is read or written: a damaged record is refused in one line
    if damaged:
        raise damaged[0]
    meta = read_record(exp / META_FILE)
    if meta is None:
        from trainable.errors import UserError

        raise UserError(f"{exp / META_FILE} is missing: {exp} is not a search folder of this tool, or its record "
                        "was deleted; nothing was changed: restore it from a copy of the search folder")
    scheduler = scheduler_record(exp / SCHEDULER_FILE)
    stopped, finished, errored = dict(scheduler["stopped"]), dict(scheduler["finished"]), dict(scheduler["errored"])
    confirmed = read_record(exp / CONFIRM_RESULTS) or {}
    best_cost = read_json(exp / BEST_DIR / "metrics.json", {})
    by_candidate = {c["trial_id"]: c for c in confirmed.get("candidates", [])}
    space = meta.get("space") or {}
    searched = list((space.get("params") or {}).keys())
    limits = budget_limits(space)
    trial_rows, epoch_rows = [], []
    records = _trial_records(exp)
    known = {Path(t["dir"]).name for t in records}
    for d in sorted(exp.glob("trial_*")):  # folders Tune never recorded (the driver was killed first)
        if d.is_dir() and d.name not in known:
            records.append({"trial_id": d.name.removeprefix("trial_"), "status": "ABANDONED", "config": {}, "dir": d})
    for t in records:
        trial_id, trial_dir = t["trial_id"], t["dir"]
        results: dict[int, dict] = {}
        tail: dict = {}
        result_file = trial_dir / "result.json"
        if result_file.exists():
            for line in result_file.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if M.EPOCH in r:
                    results[int(r[M.EPOCH])] = r  # dedupe: a resumed epoch replaces the earlier one
                tail = r
        for kept in (stopped.get(trial_id, {}).get("result"), finished.get(trial_id)):  # the scheduler's copies
            if kept and M.EPOCH in kept and int(kept[M.EPOCH]) not in results:  # Tune's lost to a kill
                results[int(kept[M.EPOCH])] = kept
        ordered = [results[e] for e in sorted(results)]
        for r in ordered:
            epoch_rows.append({"trial_id": trial_id, **{k: r.get(k) for k in M.EPOCH_METRICS},
                               "time_total_s": r.get("time_total_s")})
        status = t.get("status", "PENDING")
        outcome = _outcome(status, stopped.get(trial_id), tail, trial_id in errored)
        last = ordered[-1] if ordered else {}
        config = t.get("config") or {}
        stop = stopped.get(trial_id) or {}
        error = ""
        if outcome == ERRORED:
            error = _error_line(trial_dir)
        elif outcome == DIVERGED:
            error = str(tail.get(M.ERROR) or stop.get("error") or "diverged")
        row = {
            "trial_id": trial_id,
            "outcome": outcome,
            "error": error,
            "stopped_at": f"{stop['rung']}: {stop['position']} of {stop['of']}" if stop.get("rung") else "",
            **{f"param.{p}": config.get(p) for p in searched},
            "final_val_acc": last.get(M.VAL_ACC),
            "best_val_acc": _highest(ordered, M.VAL_ACC),
            "final_val_agreement": last.get(M.VAL_AGREEMENT),
            "best_val_agreement": _highest(ordered, M.VAL_AGREEMENT),
            "final_val_loss": last.get(M.VAL_LOSS),
            "epochs_run": len(ordered),
            "student_params": last.get(M.STUDENT_PARAMS),
            "teacher_params": last.get(M.TEACHER_PARAMS),
            "param_ratio": last.get(M.PARAM_RATIO),
            M.FLOPS: last.get(M.FLOPS),
            "wall_s": last.get("time_total_s"),
            "_dir": str(trial_dir),
            "_config": config,
        }
        cand = by_candidate.get(trial_id)
        row["confirmed_seeds"] = ",".join(map(str, cand["seeds"])) if cand and cand.get("runs") else ""
        for key in (M.VAL_ACC, M.TEST_ACC, M.VAL_AGREEMENT, M.TEST_AGREEMENT):
            for stat in ("mean", "std"):
                row[f"confirmed_{key}_{stat}"] = (cand or {}).get(f"{key}_{stat}")
        row["winner"] = trial_id == confirmed.get("winner")
        for key in (M.LATENCY_MS, M.THROUGHPUT, M.SIZE_BYTES, M.THREADS):  # the exported winner's inference cost
            row[key] = best_cost.get(key) if row["winner"] else None
        row["within_budget"] = within_limits(row, limits)
        trial_rows.append(row)
    trials = pd.DataFrame(trial_rows)
    if trials.empty:
        trials = pd.DataFrame(columns=["trial_id", "outcome", "error", "final_val_acc", "final_val_agreement",
                                       "param_ratio", "epochs_run", "within_budget", "winner", "_dir", "_config"])
    selected = f"final_{meta.get(M.SELECTED_ON) or M.VAL_ACC}"
    has = trials[selected].notna() & trials["param_ratio"].notna() if len(trials) else pd.Series(dtype=bool)
    trials["pareto"] = False
    if len(trials) and has.any():
        sub = trials[has]
        trials.loc[has, "pareto"] = pareto_mask(sub[selected].tolist(), sub["param_ratio"].tolist())
    epochs = pd.DataFrame(epoch_rows, columns=["trial_id", *M.EPOCH_METRICS, "time_total_s"])
    trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    epochs = epochs.sort_values(["trial_id", M.EPOCH], kind="stable").reset_index(drop=True)
    return Experiment(exp, meta, stopped, confirmed, trials, epochs)


def _highest(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return max(values) if values else None


def write_summaries(e: Experiment) -> dict[str, Path]:
    """Write ``summary/trials.parquet`` and ``summary/epochs.parquet`` (atomically)."""
    out = e.path / SUMMARY_DIR
    paths = {}
    for name, df in (("trials", e.trials.drop(columns=["_dir", "_config"], errors="ignore")), ("epochs", e.epochs)):
        paths[name] = out / f"{name}.parquet"
        with atomic_path(paths[name]) as tmp:
            df.to_parquet(tmp, index=False)
    return paths
