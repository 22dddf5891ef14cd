"""The record of a search folder ``<storage>/<name>/``: the name of every file this tool keeps there, and the one
way each is written, checked and read.

``search/`` writes through this module and ``results/`` reads through it; it imports neither of them, nor Ray, so
a finished search can be summarised where Ray is not installed.

Our own files live under ``akdtune/``: Tune re-uploads stale copies of top-level .json/.pkl files of the
experiment folder after a restore, which would overwrite them. Tune's own files (``experiment_state-*.json``,
``tuner.pkl``, trial folders) are Tune's.

**Damage.** Every JSON record is written atomically (``trainable.files``: a kill leaves the old file or the new
one) and carries ``_record: {format, sha256}``, the checksum of the rest of it, so a file changed or cut by
anything else is told from a whole one: :func:`read_record` raises :class:`DamagedRecord`, one line naming the
file and what to do, and changes nothing. Optuna's study journal is checked line by line before anything
appends to it (:func:`check_journal`); a record cut by a kill at its end is the one damage ``--repair`` mends
without loss of anything complete (:func:`repair_journal`). Records written before checksums existed are read
as they are.

**Moves.** A search folder may be copied, moved or archived and resumed from its new place: the records hold
paths relative to the folder, and the objects Tune pickles with absolute paths are re-pointed on restore
(:func:`relocate`, :func:`here`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from trainable import metrics as M
from trainable.errors import UserError
from trainable.files import jsonable, write_json

# ---------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------
META_FILE = "akdtune/search.json"  # how the search was started (space, task, teacher, seed, ...)
SCHEDULER_FILE = "akdtune/scheduler.json"  # rung records, stop decisions, finished trials (search.scheduler)
STUDY_FILE = "akdtune/study.journal"  # the Optuna study (Optuna's journal storage); optuna.load_study reads it
STUDY_NAME = "akdtune"  # the study's name inside STUDY_FILE
CONFIRM_DIR = "confirm"  # the confirmation phase: a Ray experiment of its own, inside the search folder
CONFIRM_PLAN = "akdtune/confirm.json"  # candidates and seeds of the confirmation phase
CONFIRM_RESULTS = "akdtune/confirmed.json"  # per candidate: seeds, val/test accuracy per seed, mean and std
RESULTS_DIR = "akdtune/results"  # every result each search trial reported: <trial id>.jsonl (append_result)
LIVE_REPORT_FILE = "akdtune/live_report.json"  # how often and how long the live report was rewritten
SUMMARY_DIR = "summary"  # trials.parquet, epochs.parquet (results.summary.write_summaries)
REPORT_FILE = "report.html"  # results.report.build_report
BEST_DIR = "best"  # the winner: a run's outputs (trainable.outputs.finish_run), metrics.json, trial.json
BEST_METRICS = "best/metrics.json"  # the winner's confirmed metrics
BEST_TRIAL = "best/trial.json"  # which trial and checkpoint it is
BEST_PARTIAL = "akdtune/best.partial"  # best/ while it is written; renamed to best/ once complete, so a search
# killed during its export has no best/ and is not finished (the resume exports again)

def best_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exported winner's ``best/metrics.json`` and ``best/trial.json`` ({} each where there is none yet)."""
    from trainable.files import read_json

    return read_json(Path(folder) / BEST_METRICS, {}), read_json(Path(folder) / BEST_TRIAL, {})


# The records a search keeps (JSON, with a checksum), and what --repair does about damage to those it can mend
# without loss; any other damaged record is restored from a copy of the folder.
RECORDS = (META_FILE, SCHEDULER_FILE, CONFIRM_PLAN, CONFIRM_RESULTS)
REPAIRS = {
    CONFIRM_PLAN: "it is made again from the trials, the same plan",
    CONFIRM_RESULTS: "it is made again from the confirmation runs' checkpoints",
    STUDY_FILE: "the cut record is dropped: never complete, Optuna never read it",
}
RECORD_FORMAT = "akdtune.record/1"
RECORD_KEY = "_record"


class DamagedRecord(UserError):
    """A record of a search folder that is not what this tool wrote: one line naming it and what to do."""

    def __init__(self, path: str | Path, why: str):
        self.path = Path(path)
        self.repair = next((what for name, what in REPAIRS.items() if self.path.as_posix().endswith(name)), None)
        what = (f"resume the search with --repair ({self.repair})" if self.repair
                else "restore it from a copy of the search folder")
        super().__init__(f"{path} is damaged ({why}); nothing was changed: {what}")

    @property
    def repairable(self) -> bool:
        return self.repair is not None


def _digest(data: dict[str, Any]) -> str:
    body = json.dumps(data, sort_keys=True, default=jsonable, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def write_record(path: str | Path, data: dict[str, Any]) -> None:
    """Write a record of a search folder (``<folder>/akdtune/....json``) atomically, with its checksum."""
    body = {k: v for k, v in data.items() if k != RECORD_KEY}
    write_json(path, {**body, RECORD_KEY: {"format": RECORD_FORMAT, "sha256": _digest(body)}})


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A record of a search folder without its checksum; None when the file does not exist.

    Raises:
        DamagedRecord: not JSON, not a mapping, an unknown format or a checksum that does not match.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedRecord(path, f"unreadable: {type(e).__name__}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise DamagedRecord(path, "not valid JSON: cut short or overwritten") from None
    if not isinstance(data, dict):
        raise DamagedRecord(path, f"holds a {type(data).__name__}, not a record")
    check = data.pop(RECORD_KEY, None)
    if check is None:
        return data  # written before records carried a checksum
    if not isinstance(check, dict) or check.get("format") != RECORD_FORMAT:
        raise DamagedRecord(path, f"unknown record format {check!r}")
    if check.get("sha256") != _digest(data):
        raise DamagedRecord(path, "its checksum does not match its contents: changed after it was written")
    return data


# ---------------------------------------------------------------------------------------------
# Trials: how each ended, and the words for it
# ---------------------------------------------------------------------------------------------
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


def tune_trials(folder: str | Path) -> list[dict[str, Any]]:
    """(trial_id, status, config, dir) of every trial Tune recorded in the experiment at ``folder``, read from its
    files without Ray: the status from the newest ``experiment_state-*.json`` (JSON), the config from each trial
    folder's ``params.json`` (Tune's copy of it), the folder named by the search's ``trial_dirname``."""
    states = sorted(Path(folder).glob("experiment_state-*.json"))
    if not states:
        raise UserError(f"{folder} is not a Ray experiment folder (no experiment_state-*.json); pass <storage>/<name> "
                        "of a search")
    try:
        data = json.loads(states[-1].read_text(encoding="utf-8"))
        entries = [json.loads(t[0] if isinstance(t, list) else t) for t in data.get("trial_data", [])]
    except (OSError, ValueError, TypeError) as e:
        raise DamagedRecord(states[-1], f"Tune's experiment state is unreadable: {type(e).__name__}") from None
    out = []
    for t in entries:
        tid = str(t.get("trial_id"))
        trial_dir = Path(folder) / f"trial_{tid}"
        params = trial_dir / "params.json"
        try:
            config = json.loads(params.read_text(encoding="utf-8")) if params.is_file() else {}
        except (OSError, ValueError):
            config = {}
        if not config and isinstance(t.get("config"), dict):
            config = t["config"]
        out.append({"trial_id": tid, "status": str(t.get("status", "PENDING")), "config": config, "dir": trial_dir})
    return out


def result_log(folder: str | Path, trial_id: str) -> Path:
    """The file of a search trial's results, one JSON line per report, in the order they arrived."""
    return Path(folder) / RESULTS_DIR / f"{trial_id}.jsonl"


def append_result(folder: str | Path, trial_id: str, result: dict[str, Any]) -> None:
    """Add one reported result (without its config) to the trial's log; a kill can cut only the line being written.

    Tune's own ``result.json`` is a copy its driver uploads now and then, and the upload is copied back over the
    driver's newer lines when a paused trial resumes, so the lines reported since the last upload are lost (a
    repeatable search pauses trials whose rung decision waits). This log is written straight into the folder."""
    path = result_log(folder, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in result.items() if k != "config"}, default=_loggable)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _loggable(v: Any) -> Any:
    try:
        return jsonable(v)
    except TypeError:
        return str(v)


def read_result_lines(path: str | Path) -> list[dict[str, Any]]:
    """The results in a JSON-lines file (a trial's log or Tune's ``result.json``), a line cut by a kill skipped."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return out
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Limits (the space's budget on the student) and the settings refused over them
# ---------------------------------------------------------------------------------------------
OVER_BUDGET = "over_budget"  # Optuna user attribute of a setting refused before training: why, in words


def space_limits(raw: dict[str, Any]) -> dict[str, float]:
    """A space's limits on the student as ``{metric: upper limit}``, from its ``limits: {param_ratio, flops}`` (or the
    older ``param_budget`` and ``budget.flops``). A trial is within the budget when every limit holds."""
    block = raw.get("limits") if isinstance(raw.get("limits"), dict) else {}
    old = raw.get("budget") if isinstance(raw.get("budget"), dict) else {}
    ratio = raw.get("param_budget", block.get(M.PARAM_RATIO))
    flops = old.get("flops", block.get(M.FLOPS))
    return {m: float(v) for m, v in ((M.PARAM_RATIO, ratio), (M.FLOPS, flops)) if v is not None}


def describe_limits(limits: dict[str, float]) -> str:
    """The budget in words, e.g. "params <= 10% of the teacher, flops <= 400,000"; "" for none."""
    return ", ".join(f"params <= {v:.0%} of the teacher" if m == M.PARAM_RATIO else f"{m} <= {v:,.0f}"
                     for m, v in limits.items())


def within_limits(result: dict[str, Any], limits: dict[str, float]) -> bool:
    """Every limit holds (a metric the result lacks counts as over)."""
    return all(result.get(m) is not None and result[m] <= lim for m, lim in limits.items())


def count_refused(study) -> int:
    """How many proposed settings an Optuna study's search refused before training, over its budget."""
    return 0 if study is None else sum(OVER_BUDGET in t.user_attrs for t in study.get_trials(deepcopy=False))


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


# ---------------------------------------------------------------------------------------------
# The scheduler's record, as plain data
# ---------------------------------------------------------------------------------------------
SCHEDULER_VERSION = 1


def empty_scheduler_record() -> dict[str, Any]:
    """``rungs``: rung -> trial id -> its objective values there; ``stopped``: trial id -> the decision that cut it
    short (``reason``, ``rung``, ``epoch``, ``position``, ``of``, and ``result``: the epoch's metrics it judged);
    ``finished``: trial id -> its last result; ``errored``: trial id -> the epoch it had reached when it failed for good
    (no retry left); ``order``: the trial ids in the order their settings were proposed (repeatable searches);
    ``waiting``: trial id -> the rung whose decision waits on earlier trials."""
    return {"version": SCHEDULER_VERSION, "rungs": {}, "stopped": {}, "finished": {}, "errored": {}}


def scheduler_record(path: str | Path | None) -> dict[str, Any]:
    """The scheduler's record at ``path`` (empty where there is none yet). Raises DamagedRecord."""
    record = read_record(path) if path else None
    return {**empty_scheduler_record(), **(record or {})}


def stop_decisions(path: str | Path) -> dict[str, dict[str, Any]]:
    """The trials the scheduler of a search cut short, by trial id (see :func:`empty_scheduler_record`)."""
    return dict(scheduler_record(path)["stopped"])


# ---------------------------------------------------------------------------------------------
# The Optuna study's journal
# ---------------------------------------------------------------------------------------------
def journal_storage(path: str | None):
    """Optuna's journal storage on the file at ``path`` (in memory when None): the one way the study is opened."""
    import optuna

    if path is None:
        return optuna.storages.InMemoryStorage()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(path: str | Path):
    """The search's Optuna study, read from its journal file ``path`` (checked first; for reading: a search's sampler
    opens it with ``optuna.create_study(..., load_if_exists=True)`` on :func:`journal_storage`); None when there
    is none yet."""
    import optuna

    if not Path(path).is_file():
        return None
    check_journal(path)
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(str(path)))
    except KeyError:  # no study of that name in it yet
        return None


def _journal_lines(path: str | Path) -> tuple[bytes, list[bytes]]:
    data = Path(path).read_bytes()
    return data, data.split(b"\n")


def check_journal(path: str | Path) -> None:
    """The study journal at ``path`` is whole: every line a complete JSON record (Optuna skips a cut last line, and a
    record appended after it would make the file unreadable for good). Raises DamagedRecord."""
    if not Path(path).is_file():
        return
    data, lines = _journal_lines(path)
    for i, line in enumerate(lines[:-1]):
        try:
            json.loads(line)
        except ValueError:
            raise DamagedRecord(path, f"record {i + 1} of {len(lines) - 1} is not valid JSON") from None
    if lines[-1]:  # bytes after the last newline: a record cut short
        raise DamagedRecord(path, f"its last record is cut short ({len(lines[-1])} bytes)")


def repair_journal(path: str | Path) -> int:
    """Drop a cut last record of the study journal at ``path`` (see :func:`check_journal`); the bytes dropped."""
    if not Path(path).is_file():
        return 0
    data, lines = _journal_lines(path)
    if not lines[-1]:
        return 0
    keep = len(data) - len(lines[-1])
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def check_records(folder: str | Path) -> list[DamagedRecord]:
    """Every record of the search at ``folder`` that is damaged (each with what to do), the journal included."""
    found = []
    for name in RECORDS:
        try:
            read_record(Path(folder) / name)
        except DamagedRecord as e:
            found.append(e)
    try:
        check_journal(Path(folder) / STUDY_FILE)
    except DamagedRecord as e:
        found.append(e)
    return found


def repair_records(folder: str | Path) -> list[str]:
    """Mend what can be mended without loss (``--repair``); what was done, one line each. Raises the first
    DamagedRecord that cannot be mended (nothing is changed then)."""
    damaged = check_records(folder)
    fatal = [d for d in damaged if not d.repairable]
    if fatal:
        raise fatal[0]
    done = []
    for d in damaged:
        if d.path == Path(folder) / STUDY_FILE:
            done.append(f"{STUDY_FILE}: dropped a cut last record ({repair_journal(d.path)} bytes)")
        else:
            os.remove(d.path)
            done.append(f"{d.path.relative_to(folder).as_posix()}: removed; {d.repair}")
    return done


# ---------------------------------------------------------------------------------------------
# Moves: a copied or moved search writes into its own folder
# ---------------------------------------------------------------------------------------------
_moved: dict[str, str] = {}  # the folder a search recorded as its own (search.json's ``folder``) -> where it is now


def relocate(recorded: str | None, now: str) -> None:
    """The search recorded at ``recorded`` is now at ``now``: every path into it that an object restored from Tune's
    pickles holds is re-pointed (:func:`here`), so a resume never writes into the folder it was copied from."""
    _moved.clear()
    if recorded and os.path.normpath(recorded) != os.path.normpath(now):
        _moved[os.path.normpath(recorded)] = os.path.normpath(now)


def here(path: str | None) -> str | None:
    """``path`` re-pointed into the search's current folder where the search was copied or moved; else as it is."""
    if path is None:
        return None
    p = os.path.normpath(str(path))
    for old, new in _moved.items():
        if p == old or p.startswith(old + os.sep):
            return new + p[len(old):]
    return str(path)
