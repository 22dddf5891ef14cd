"""Read a Ray experiment folder (finished, interrupted or resumed) into two tidy tables.

``trials`` — one row per trial (columns documented in ``TRIAL_COLUMNS``), ``epochs`` — one row per
trial per reported epoch (every metric of ``base.metrics.EPOCH_METRICS``). Rows that a resume
reports twice (an epoch re-run from a checkpoint) are deduplicated, keeping the latest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from base import metrics as M
from base.errors import UserError
from base.files import atomic_path
from base.layout import (
    CONFIRM_RESULTS,
    EPOCHS_TABLE,
    META_FILE,
    SCHEDULER_FILE,
    TRIAL_ERROR,
    TRIAL_PREFIX,
    TRIALS_TABLE,
    TUNE_RESULTS,
    best_files,
    has_tune_state,
    trial_folders,
)
from results.checks import check_records
from results.limits import pareto_mask, space_limits, within_limits
from results.recordfile import read_record
from results.resultlog import read_result_lines, result_log
from results.schedule_record import scheduler_record
from results.tunefiles import tune_trials

# How a trial ended, and the words for it
COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED, UNFINISHED = (
    "completed", "stopped_early", "diverged", "errored", "unfinished")
FINISHED = (COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED)  # a trial that will not run again
SUCCEEDED = (COMPLETED, STOPPED_EARLY)  # a trial with a result that may be the best


def count_outcomes(outcomes) -> dict[str, int]:
    """How many trials ended each way (every outcome named, 0 where none)."""
    outcomes = list(outcomes)
    return {k: outcomes.count(k) for k in (COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED, UNFINISHED)}


def outcomes_line(counts: dict[str, int], refused: int = 0) -> str:
    """The trials in one line, e.g. "12 completed, 3 stopped early, 0 diverged, 1 errored; 9 proposed setting(s) over
    the budget refused before training"."""
    return (f"{counts[COMPLETED]} completed, {counts[STOPPED_EARLY]} stopped early, {counts[DIVERGED]} diverged, "
            f"{counts[ERRORED]} errored" + (f", {counts[UNFINISHED]} unfinished" if counts[UNFINISHED] else "")
            + (f"; {refused} proposed setting(s) over the budget refused before training" if refused else ""))


TRIAL_COLUMNS = {
    "trial": "the trial's place in the order its setting was proposed (0, 1, ...; the table's order)",
    "trial_id": "Ray's trial id",
    "outcome": f"{COMPLETED} | {STOPPED_EARLY} (by the scheduler) | {DIVERGED} (NaN/Inf loss) | {ERRORED} | "
               f"{UNFINISHED} (interrupted, resumable). A trial folder the driver created just before it was killed, "
               "unknown to Tune (the resumed search ran another trial in its place), is not a row: see "
               "Experiment.abandoned",
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
    M.STUDENT_PARAMS: "student parameter count",
    M.TEACHER_PARAMS: "teacher parameter count",
    M.PARAM_RATIO: "student_params / teacher_params",
    M.FLOPS: "the student's floating-point operations per image (one forward; a multiply-add counts 2)",
    M.LATENCY_MS: "the winner only: median CPU milliseconds per image at batch 1 (best/student.pt2's model)",
    M.THROUGHPUT: "the winner only: median CPU images per second at batch 256",
    M.SIZE_BYTES: "the winner only: size of best/student.pt2",
    M.THREADS: "the winner only: torch CPU threads during that timing",
    "within_budget": "param_ratio <= the space's param_budget and flops <= its budget.flops (true when it has none)",
    "pareto": "on the selection-metric-versus-size Pareto front (max final_val_acc or final_val_agreement, min "
              "param_ratio)",
    M.WALL_S: "seconds the trial ran (summed over resumes)",
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
    stopped: dict[str, dict[str, Any]]  # the scheduler's stop decisions by trial id (results.schedule_record.stop_decisions)
    confirmed: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    abandoned: tuple[str, ...] = ()  # trial folders a kill left before Tune recorded them: not trials, not rows

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
        return bool((self.trials["outcome"] == UNFINISHED).any()) or len(self.trials) < self.meta.get("num_samples", 0)


def _outcome(status: str, decision: dict | None, last: dict, errored: bool = False) -> str:
    if status == "ERROR" or (errored and status != "TERMINATED"):  # errored: the scheduler saw it fail for good
        return ERRORED
    if last.get(M.DIVERGED) or (decision or {}).get("reason") == "diverged":
        return DIVERGED
    if decision:
        return STOPPED_EARLY
    if status != "TERMINATED":
        return UNFINISHED
    return COMPLETED


def _error_line(trial_dir: Path) -> str:
    """The reason a trial errored, in one line: the last line of its traceback (the exception and its message)."""
    path = trial_dir / TRIAL_ERROR
    text = path.read_text(errors="replace") if path.exists() else ""
    if "ActorDiedError" in text or "worker process has died" in text:
        return ("the worker died (killed, out of memory, or crashed outside Python); its traceback is in "
                f"{path.name}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "error"


def _open_folder(exp: Path) -> dict[str, Any]:
    """The search record of the folder, after every check (a folder, Tune's, every record whole). Raises UserError."""
    if not exp.is_dir():
        raise UserError(f"experiment folder not found: {exp}; pass <storage>/<name> of a search")
    if not has_tune_state(exp):
        raise UserError(f"{exp} is not a Ray experiment folder (no experiment_state-*.json); "
                        "pass <storage>/<name> of a search")
    damaged = check_records(exp)  # before anything is read or written: a damaged record is refused in one line
    if damaged:
        raise damaged[0]
    meta = read_record(exp / META_FILE)
    if meta is None:
        raise UserError(f"{exp / META_FILE} is missing: {exp} is not a search folder of this tool, or its record "
                        "was deleted; nothing was changed: restore it from a copy of the search folder")
    return meta


def _all_trials(exp: Path) -> list[dict[str, Any]]:
    """Tune's trials, and the trial folders it never recorded (the driver was killed first) as abandoned."""
    records = tune_trials(exp)
    known = {Path(t["dir"]).name for t in records}
    for d in trial_folders(exp):
        if d.name not in known:
            records.append({"trial_id": d.name.removeprefix(TRIAL_PREFIX), "status": "ABANDONED", "config": {},
                            "dir": d})
    return records


def _results(trial_dir: Path, logged: list[dict], kept: list[dict | None]) -> tuple[list[dict], dict]:
    """A trial's results by epoch (a resumed epoch replaces the earlier one), and its last line (e.g. a divergence
    report). ``logged``: the search's own log of the trial's results, which has every line Tune's ``result.json``
    lost when the trial was paused (read after it, so its newer lines win). ``kept``: the scheduler's copies of
    results, used where both lost one (a search started before the log existed, or a kill)."""
    results: dict[int, dict] = {}
    tail: dict = {}
    for r in [*read_result_lines(trial_dir / TUNE_RESULTS), *logged]:
        if M.EPOCH in r:
            results[int(r[M.EPOCH])] = r
        tail = r
    for r in kept:
        if r and M.EPOCH in r and int(r[M.EPOCH]) not in results:
            results[int(r[M.EPOCH])] = r
    return [results[e] for e in sorted(results)], tail


def _trial_row(t: dict, ordered: list[dict], tail: dict, scheduler: dict, searched: list[str]) -> dict[str, Any]:
    """One row of the trials table, before the confirmation's and the export's columns."""
    trial_id, trial_dir = t["trial_id"], t["dir"]
    stop = scheduler["stopped"].get(trial_id) or {}
    outcome = _outcome(t.get("status", "PENDING"), stop, tail, trial_id in scheduler["errored"])
    last, config = (ordered[-1] if ordered else {}), (t.get("config") or {})
    error = _error_line(trial_dir) if outcome == ERRORED else (
        str(tail.get(M.ERROR) or stop.get("error") or "diverged") if outcome == DIVERGED else "")
    return {
        "trial_id": trial_id, "outcome": outcome, "error": error,
        "stopped_at": f"{stop['rung']}: {stop['position']} of {stop['of']}" if stop.get("rung") else "",
        **{f"param.{p}": config.get(p) for p in searched},
        "final_val_acc": last.get(M.VAL_ACC), "best_val_acc": _highest(ordered, M.VAL_ACC),
        "final_val_agreement": last.get(M.VAL_AGREEMENT), "best_val_agreement": _highest(ordered, M.VAL_AGREEMENT),
        "final_val_loss": last.get(M.VAL_LOSS), "epochs_run": len(ordered),
        M.STUDENT_PARAMS: last.get(M.STUDENT_PARAMS), M.TEACHER_PARAMS: last.get(M.TEACHER_PARAMS),
        M.PARAM_RATIO: last.get(M.PARAM_RATIO), M.FLOPS: last.get(M.FLOPS), M.WALL_S: last.get("time_total_s"),
        "_dir": str(trial_dir), "_config": config,
    }


def _add_confirmation(row: dict[str, Any], confirmed: dict, by_candidate: dict[str, dict], best_cost: dict,
                      limits: dict[str, float]) -> None:
    """The confirmation's columns, the exported winner's inference cost, and whether the trial is within the budget."""
    cand = by_candidate.get(row["trial_id"])
    row["confirmed_seeds"] = ",".join(map(str, cand["seeds"])) if cand and cand.get("runs") else ""
    for key in (M.VAL_ACC, M.TEST_ACC, M.VAL_AGREEMENT, M.TEST_AGREEMENT):
        for stat in ("mean", "std"):
            row[f"confirmed_{key}_{stat}"] = (cand or {}).get(f"{key}_{stat}")
    row["winner"] = row["trial_id"] == confirmed.get("winner")
    for key in (M.LATENCY_MS, M.THROUGHPUT, M.SIZE_BYTES, M.THREADS):
        row[key] = best_cost.get(key) if row["winner"] else None
    row["within_budget"] = within_limits(row, limits)


def _mark_pareto(trials: pd.DataFrame, selected: str) -> None:
    has = trials[selected].notna() & trials[M.PARAM_RATIO].notna() if len(trials) else pd.Series(dtype=bool)
    trials["pareto"] = False
    if len(trials) and has.any():
        sub = trials[has]
        trials.loc[has, "pareto"] = pareto_mask(sub[selected].tolist(), sub[M.PARAM_RATIO].tolist())


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder into an ``Experiment`` (tables built in memory, nothing written). Reads files only:
    no Ray, no ``search/``."""
    exp = Path(path)
    meta = _open_folder(exp)
    scheduler = scheduler_record(exp / SCHEDULER_FILE)
    confirmed = read_record(exp / CONFIRM_RESULTS) or {}
    best_cost = best_files(exp)[0]
    space = meta.get("space") or {}
    searched, limits = list((space.get("params") or {}).keys()), space_limits(space)
    by_candidate = {c["trial_id"]: c for c in confirmed.get("candidates", [])}
    trial_rows, epoch_rows = [], []
    found = _all_trials(exp)
    abandoned = tuple(t["trial_id"] for t in found if t["status"] == "ABANDONED")
    for t in found:
        tid = t["trial_id"]
        if tid in abandoned:
            continue
        stop = scheduler["stopped"].get(tid) or {}
        rungs = [recs[tid].get("result") for recs in scheduler["rungs"].values() if tid in recs]
        ordered, tail = _results(t["dir"], read_result_lines(result_log(exp, tid)),
                                 [stop.get("result"), scheduler["finished"].get(tid), *rungs])
        if stop.get("reason") == "rung" and stop.get(M.EPOCH):  # epochs run after the rung's decision do not count
            ordered = [r for r in ordered if int(r[M.EPOCH]) <= int(stop[M.EPOCH])]
        epoch_rows += [{"trial_id": tid, **{k: r.get(k) for k in M.EPOCH_METRICS}, "time_total_s": r.get("time_total_s")}
                       for r in ordered]
        row = _trial_row(t, ordered, tail, scheduler, searched)
        _add_confirmation(row, confirmed, by_candidate, best_cost, limits)
        trial_rows.append(row)
    trials = pd.DataFrame(trial_rows) if trial_rows else pd.DataFrame(columns=[
        "trial_id", "outcome", "error", "final_val_acc", "final_val_agreement", M.PARAM_RATIO, "epochs_run",
        "within_budget", "winner", "_dir", "_config"])
    _mark_pareto(trials, f"final_{meta.get(M.SELECTED_ON) or M.VAL_ACC}")
    epochs = pd.DataFrame(epoch_rows, columns=["trial_id", *M.EPOCH_METRICS, "time_total_s"])
    place = {t: i for i, t in enumerate(scheduler.get("order") or [])}
    trials.insert(0, "trial", pd.array([place.get(t) for t in trials["trial_id"]], dtype="Int64"))
    trials = trials.sort_values(["trial", "trial_id"], kind="stable", na_position="last").reset_index(drop=True)
    epochs = epochs.sort_values(["trial_id", M.EPOCH], kind="stable").reset_index(drop=True)
    return Experiment(exp, meta, dict(scheduler["stopped"]), confirmed, trials, epochs, abandoned)


def _highest(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return max(values) if values else None


def write_summaries(e: Experiment) -> dict[str, Path]:
    """Write ``summary/trials.parquet`` and ``summary/epochs.parquet`` (atomically)."""
    paths = {}
    for name, df in (("trials", e.trials.drop(columns=["_dir", "_config"], errors="ignore")), ("epochs", e.epochs)):
        paths[name] = e.path / (TRIALS_TABLE if name == "trials" else EPOCHS_TABLE)
        with atomic_path(paths[name]) as tmp:
            df.to_parquet(tmp, index=False)
    return paths
