"""The run folder's schema: the name of every file a search keeps in ``<storage>/<name>/``, the Tune files it
reads there, and the one way each record is written, checked and read. Nothing else names a file of the folder
(``tests/test_runfolder.py`` reads the sources and says so).

``search/`` writes through this module and ``results/`` reads through it; it imports neither of them, nor Ray, so
a finished search can be summarised where Ray is not installed.

Our own files live under ``akdtune/``: Tune re-uploads stale copies of top-level .json/.pkl files of the
experiment folder after a restore, which would overwrite them. Tune's own files (``experiment_state-*.json``,
``tuner.pkl``, trial folders) are Tune's; where the storage is local Tune writes them through
``base.atomicfs`` (atomically).

**Damage.** Every JSON record is written atomically (``base.files``: a kill leaves the old file or the new
one) and carries ``_record: {format, sha256}``, the checksum of the rest of it, so a file changed or cut by
anything else is told from a whole one: :func:`read_record` raises :class:`DamagedRecord`, one line naming the
file and what to do, and changes nothing; a record without a checksum is damage. Optuna's study journal is checked
line by line before anything appends to it (:func:`check_journal`), Tune's state files are checked whole
(:func:`check_tune_state`), and the records are checked against each other (:func:`check_agreement`: a journal
cut at a line boundary reads as whole alone). ``--repair`` mends only what the other records rebuild without
loss, after checking the result (:func:`repair_records`).

**Moves.** A search folder may be copied, moved or archived and resumed from its new place: the records hold
paths relative to the folder, and the objects Tune pickles with absolute paths are re-pointed on restore
(:func:`relocate`, :func:`here`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

from base import storage
from base.errors import UserError
from base.files import jsonable, read_json, write_json

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
LOCK_FILE = "akdtune/driver.lock"  # a local search: flock'ed by its driver, names it (search.lease)
LEASE_DIR = "akdtune/lease"  # a search on a URI: each driver's claim or lease, <token>.json (search.lease)
LIVE_REPORT_FILE = "akdtune/live_report.json"  # how often and how long the live report was rewritten
SUMMARY_DIR = "summary"  # trials.parquet, epochs.parquet (results.summary.write_summaries)
REPORT_FILE = "report.html"  # results.report.build_report
BEST_DIR = "best"  # the winner: a run's outputs (trainable.outputs.finish_run), metrics.json, trial.json
BEST_METRICS = "best/metrics.json"  # the winner's confirmed metrics
BEST_TRIAL = "best/trial.json"  # which trial and checkpoint it is
BEST_MANIFEST = "best/manifest.json"  # every other file of best/ (size, sha256) and the winner checkpoint's
BEST_PARTIAL = "akdtune/best.partial"  # best/ while it is written; renamed to best/ once complete, so a search
# killed during its export has no best/ and is not finished (the resume exports again)
TRIALS_TABLE = f"{SUMMARY_DIR}/trials.parquet"
EPOCHS_TABLE = f"{SUMMARY_DIR}/epochs.parquet"

# Tune's files, which this tool reads (never writes): how Tune lays out an experiment folder.
TUNER_FILE = "tuner.pkl"  # written when a search starts: the search exists from then on
EXPERIMENT_STATE = "experiment_state-*.json"  # one per session; the newest is the one a resume restores
TRIAL_PREFIX = "trial_"  # trial folders: trial_<id> (search.callbacks.trial_dirname)
TUNE_RESULTS = "result.json"  # in a trial folder: Tune's copy of its results
TRIAL_ERROR = "error.txt"  # in a trial folder: the traceback of its last failure
CHECKPOINT_PREFIX = "checkpoint_"  # in a trial folder: checkpoint_000000, checkpoint_000001, ...
CHECKPOINT_NAME = "checkpoint.pt"  # in a checkpoint folder: the run's state (trainable.akd.CHECKPOINT_FILE)


# What the tool itself writes into a search folder (the rest is Tune's): what a working copy of a search on a URI
# uploads (base.storage.Mirror).
OWN = (META_FILE.split("/")[0] + "/", BEST_DIR + "/", SUMMARY_DIR + "/", REPORT_FILE)


def is_own(rel: str) -> bool:
    """Whether the path ``rel`` (relative to the search folder) is one of the tool's own files; a file being written
    (``best.partial``) is not yet."""
    return rel.startswith(OWN) and not rel.startswith((BEST_PARTIAL + "/", LEASE_DIR + "/", LOCK_FILE))


def tune_started(folder: str | Path) -> bool:
    """Whether Tune started an experiment in ``folder`` (a search exists there, finished or not); a URI is asked."""
    if storage.is_uri(folder):
        return storage.exists(str(folder), TUNER_FILE)
    return (Path(folder) / TUNER_FILE).exists()


def has_tune_state(folder: str | Path) -> bool:
    """Whether Tune saved any state of the experiment in ``folder`` (else nothing there can be restored)."""
    return bool(list(Path(folder).glob(EXPERIMENT_STATE)))


def trial_folder_name(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_folders(folder: str | Path) -> list[Path]:
    """The trial folders of the experiment in ``folder``, by name."""
    return sorted(d for d in Path(folder).glob(f"{TRIAL_PREFIX}*") if d.is_dir())


def latest_checkpoint(trial_dir: str | Path) -> Path | None:
    """The newest ``checkpoint_NNNNNN/checkpoint.pt`` of a trial folder."""
    found = []
    for d in Path(trial_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", d.name)
        if m and (d / CHECKPOINT_NAME).is_file():
            found.append((int(m.group(1)), d / CHECKPOINT_NAME))
    return max(found)[1] if found else None


def best_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exported winner's ``best/metrics.json`` and ``best/trial.json`` ({} each where there is none yet)."""
    return read_json(Path(folder) / BEST_METRICS, {}), read_json(Path(folder) / BEST_TRIAL, {})


# The records a search keeps (JSON, with a checksum), and what --repair does about damage to those it can mend
# without loss; any other damaged record is restored from a copy of the folder.
RECORDS = (META_FILE, SCHEDULER_FILE, CONFIRM_PLAN, CONFIRM_RESULTS)
REPAIRS = {
    CONFIRM_PLAN: "it is made again from the trials, the same plan",
    CONFIRM_RESULTS: "it is made again from the confirmation runs' checkpoints",
    STUDY_FILE: "the cut record is dropped: never complete, Optuna never read it",
    "params.json": "it is written again from Tune's experiment state",
    ".pkl": "it is made again from the scheduler's order",  # the searcher's state (check_tune_state names the others)
    "/" + BEST_DIR: "best/ is exported again from the winner's checkpoint",
}
RECORD_FORMAT = "akdtune.record/1"
RECORD_KEY = "_record"


class DamagedRecord(UserError):
    """A record of a search folder that is not what this tool wrote: one line naming it and what to do."""

    def __init__(self, path: str | Path, why: str, repairable: bool = True, repair: str | None = None):
        self.path, self.why = Path(path), why
        self.repair = repair or next((what for name, what in REPAIRS.items() if self.path.as_posix().endswith(name)),
                                     None) if repairable else None
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
    storage.written(path)  # a search on a URI: uploaded now, whole


# What each record must hold (key: its type), checked after its checksum: a record that this tool wrote holds them.
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    META_FILE: {"space": dict, "num_samples": int, "folder": str},
    SCHEDULER_FILE: {"rungs": dict, "stopped": dict, "finished": dict, "errored": dict},
    CONFIRM_PLAN: {"candidates": list, "runs": list},
    CONFIRM_RESULTS: {"candidates": list},
}


def _check_fields(path: str | Path, data: dict[str, Any]) -> None:
    name = next((n for n in REQUIRED if Path(path).as_posix().endswith(n)), None)
    for key, kind in (REQUIRED.get(name) or {}).items():
        if key not in data:
            raise DamagedRecord(path, f"it lacks {key!r}, which every such record holds")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise DamagedRecord(path, f"its {key!r} is a {type(data[key]).__name__}")


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
        raise DamagedRecord(path, "it has no checksum, which this tool writes into every record: emptied or replaced")
    if not isinstance(check, dict) or check.get("format") != RECORD_FORMAT:
        raise DamagedRecord(path, f"unknown record format {check!r}")
    if check.get("sha256") != _digest(data):
        raise DamagedRecord(path, "its checksum does not match its contents: changed after it was written")
    _check_fields(path, data)
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
    states = sorted(Path(folder).glob(EXPERIMENT_STATE))
    if not states:
        raise UserError(f"{folder} is not a Ray experiment folder (no experiment_state-*.json); pass <storage>/<name> "
                        "of a search")
    out = []
    for t in _experiment_entries(states[-1]):
        tid = str(t.get("trial_id"))
        trial_dir = Path(folder) / trial_folder_name(tid)
        config = t.get("config") if isinstance(t.get("config"), dict) else _params(trial_dir / "params.json")
        out.append({"trial_id": tid, "status": str(t.get("status", "PENDING")), "config": config or {},
                    "dir": trial_dir})
    return out


def _experiment_entries(path: Path) -> list[dict[str, Any]]:
    """The trials' entries of Tune's experiment state at ``path`` (JSON). Raises DamagedRecord."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [json.loads(t[0] if isinstance(t, list) else t) for t in data["trial_data"]]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        why = "empty" if path.is_file() and path.stat().st_size == 0 else f"unreadable: {type(e).__name__}"
        raise DamagedRecord(path, f"Tune's experiment state is {why}", repairable=False) from None
    if not all(isinstance(t, dict) and t.get("trial_id") for t in entries):
        raise DamagedRecord(path, "Tune's experiment state has a trial without an id", repairable=False)
    return entries


def _params(path: Path) -> dict[str, Any] | None:
    """A trial's ``params.json`` (Tune's copy of its config); None where it is missing, cut or not a mapping."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# Tune's files in a search folder: whole, and in agreement with the search's own records
# ---------------------------------------------------------------------------------------------
# Tune keeps one of each per session (the newest by name is the one it restores), next to its tuner.pkl.
TUNE_STATE = (EXPERIMENT_STATE, "search_gen_state-*.json", "searcher-state-*.pkl", "callback-states-*.pkl")
SEARCHER_STATE = "searcher-state-*.pkl"  # our searcher's own JSON (search.searcher.OptunaSearcher.save)
RAY_ID = "ray_trial_id"  # the Optuna user attribute naming a study trial's Ray trial


def tune_state_files(folder: str | Path) -> list[Path]:
    """``tuner.pkl`` and the newest of each of Tune's state files (those a resume restores), where they exist."""
    folder = Path(folder)
    found = [folder / TUNER_FILE] if tune_started(folder) else []
    for pattern in TUNE_STATE:
        files = sorted(folder.glob(pattern))
        if files:
            found.append(files[-1])
    return found


def _whole_pickle(data: bytes) -> bool:
    """A pickle's first and last opcodes (PROTO ... STOP) are there: not empty, not cut short. Nothing is unpickled."""
    return len(data) > 2 and data[0] == 0x80 and data.endswith(b".")


def check_tune_state(folder: str | Path) -> list[DamagedRecord]:
    """Tune's files that a resume reads and that are empty, cut short or unreadable (a kill while Tune copied them,
    or damage afterwards), each as a DamagedRecord; and each recorded trial's ``params.json``."""
    found = []
    for path in tune_state_files(folder):
        try:
            data = path.read_bytes()
        except OSError as e:
            found.append(DamagedRecord(path, f"unreadable: {type(e).__name__}", repairable=False))
            continue
        if path.match(EXPERIMENT_STATE):
            try:
                _experiment_entries(path)
            except DamagedRecord as e:
                found.append(e)
        elif path.match(SEARCHER_STATE):
            try:
                ok = isinstance(json.loads(data).get("asked"), list)
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                found.append(DamagedRecord(path, "Tune's copy of the searcher's state is empty or cut short"))
        elif not _whole_pickle(data):
            found.append(DamagedRecord(path, f"Tune's state file is {'empty' if not data else 'cut short'}: a kill "
                                       "while Tune copied it, or damage since", repairable=False))
    if not any(d.path.match(EXPERIMENT_STATE) for d in found) and has_tune_state(folder):
        for t in tune_trials(folder):
            params = t["dir"] / "params.json"
            if params.exists() and _params(params) is None:
                found.append(DamagedRecord(params, "Tune's copy of the trial's settings is empty or cut short"))
    return found


def _study_ray_ids(path: str | Path) -> set[str] | None:
    """The Ray trial ids of the study in the journal at ``path`` (None where there is no study yet)."""
    study = open_study(path)
    if study is None:
        return None
    return {str(t.user_attrs[RAY_ID]) for t in study.get_trials(deepcopy=False) if RAY_ID in t.user_attrs}


RETELL = "each finished trial's outcome is told to the study again from the scheduler's record"


def running_but_finished(folder: str | Path, journal: str | Path | None = None) -> list[str]:
    """The trials the scheduler recorded as finished or stopped whose newest record in the study is still running (a
    study journal cut short after they were told, or a kill between the scheduler's record and the study's)."""
    folder = Path(folder)
    study = open_study(journal or folder / STUDY_FILE)
    if study is None:
        return []
    scheduler = scheduler_record(folder / SCHEDULER_FILE)
    newest = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if RAY_ID in t.user_attrs:
            newest[str(t.user_attrs[RAY_ID])] = t
    return [tid for tid in [*scheduler["finished"], *scheduler["stopped"]]
            if tid in newest and newest[tid].state.name == "RUNNING"]


def check_agreement(folder: str | Path, journal: str | Path | None = None) -> list[DamagedRecord]:
    """The study, the scheduler's record and Tune's trials name the same trials: every trial Tune recorded, and every
    trial the scheduler ordered or decided on, is in the study (its setting is asked there before Tune or the
    scheduler hears of it), and every trial Tune recorded of a repeatable search is in the scheduler's order. A study
    journal cut at a record's end, or a record emptied, passes every check of its own and fails this one. ``journal``:
    the study journal to check in place of the folder's (a repair's result, before it is written)."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        return []
    journal = Path(journal or folder / STUDY_FILE)
    scheduler = scheduler_record(folder / SCHEDULER_FILE)
    tune_ids = [t["trial_id"] for t in tune_trials(folder)] if has_tune_state(folder) else []
    decided = [*(scheduler.get("order") or []), *scheduler["stopped"], *scheduler["finished"], *scheduler["errored"]]
    study = _study_ray_ids(journal) if journal.is_file() else None
    found = []
    named = sorted(set(tune_ids) | set(decided))
    if named and (study is None or not set(named) <= study):
        have = len(set(named) & (study or set()))
        found.append(DamagedRecord(folder / STUDY_FILE, f"it holds {have} of the {len(named)} trials that Tune and "
                                   "the scheduler recorded: cut short or replaced", repairable=False))
    running = running_but_finished(folder, journal) if not found and (folder / BEST_TRIAL).is_file() else []
    if running:  # a finished search: nothing will tell them again
        found.append(DamagedRecord(folder / STUDY_FILE, f"it has {len(running)} trial(s) running that the scheduler "
                                   f"recorded as finished, e.g. {running[0]}: cut short", repair=RETELL))
    order = scheduler.get("order")
    if order is not None and not set(tune_ids) <= set(order):
        found.append(DamagedRecord(folder / SCHEDULER_FILE, f"its order names {len(set(tune_ids) & set(order))} of "
                                   f"the {len(set(tune_ids))} trials Tune recorded: replaced by an older copy",
                                   repairable=False))
    return found


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
    storage.written(path)


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
    if path is None:
        return optuna.storages.InMemoryStorage()

    class UploadedJournal(JournalFileBackend):
        """The journal file; in a working copy of a search on a URI, uploaded whole after each append."""

        def append_logs(self, logs):
            super().append_logs(logs)
            storage.written(path)

    return optuna.storages.JournalStorage(UploadedJournal(str(path)))


def open_study(path: str | Path):
    """The search's Optuna study, read from its journal file ``path`` (checked first; for reading: a search's sampler
    opens it with ``optuna.create_study(..., load_if_exists=True)`` on :func:`journal_storage`); None when there
    is none yet."""
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


def remove_stale_lock(path: str | Path) -> bool:
    """Remove the study journal's lock (``<journal>.lock``, Optuna's symlink) that a writer killed while appending
    left behind; call it only where no other process of the search can be writing (a resume, before it starts).
    Optuna waits for it forever where it points into a folder the search was copied or moved from. Whether one was
    removed."""
    lock = Path(str(path) + ".lock")
    if not os.path.lexists(lock):
        return False
    os.unlink(lock)
    return True


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


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_entries(folder: Path, under: Path) -> dict[str, dict[str, Any]]:
    """Size and checksum of the file ``under``, or of every file in the folder ``under``, by path in ``folder``."""
    files = [under] if under.is_file() else sorted(p for p in under.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in files if not p.name.startswith(".")}


def write_best_manifest(best: str | Path, folder: str | Path, checkpoint: str) -> None:
    """``manifest.json`` of the ``best/`` being written at ``best`` (in the search ``folder``): the size and checksum
    of each of its files and of the winner's checkpoint (``checkpoint``, relative to the folder), so that
    ``report.py`` and ``--resume`` tell a changed or missing one from a whole one."""
    best, folder = Path(best), Path(folder)
    files = {rel: v for rel, v in _manifest_entries(best, best).items() if rel != Path(BEST_MANIFEST).name}
    ck = folder / checkpoint
    write_record(best / Path(BEST_MANIFEST).name, {
        "files": files, "checkpoint": checkpoint,
        "checkpoint_files": _manifest_entries(folder, ck) if ck.exists() else {}})


def check_best(folder: str | Path) -> list[DamagedRecord]:
    """The winner a finished search hands over (``best/``) and the checkpoint it was made from, against
    ``best/manifest.json``. A search exported before manifests were written has none: nothing to check. The winner's
    checkpoint is checked where its trial's checkpoints are on this disk (a working copy of a search on a URI holds
    none)."""
    folder = Path(folder)
    if not (folder / BEST_TRIAL).is_file():
        return []
    try:
        manifest = read_record(folder / BEST_MANIFEST)
    except DamagedRecord as e:
        return [DamagedRecord(folder / BEST_DIR, e.why)]
    if manifest is None:
        return []
    found = []
    for rel, want in sorted((manifest.get("files") or {}).items()):
        path = folder / BEST_DIR / rel
        if not path.is_file():
            found.append(DamagedRecord(folder / BEST_DIR, f"its {rel} is missing"))
        elif path.stat().st_size != want.get("size") or file_digest(path) != want.get("sha256"):
            found.append(DamagedRecord(folder / BEST_DIR, f"its {rel} does not match its checksum in {BEST_MANIFEST}: "
                                                          "changed since the export"))
    ck = folder / str(manifest.get("checkpoint") or "")
    trial = next((p for p in ck.parents if p.name.startswith(TRIAL_PREFIX)), None)
    here = list(trial.glob(f"{CHECKPOINT_PREFIX}*")) if trial is not None and manifest.get("checkpoint") else []
    for rel, want in sorted((manifest.get("checkpoint_files") or {}).items()):
        path = folder / rel
        if here and (not path.is_file() or path.stat().st_size != want.get("size")
                     or file_digest(path) != want.get("sha256")):
            found.append(DamagedRecord(path, f"the winner's checkpoint that best/ was made from is "
                                             f"{'missing' if not path.is_file() else 'changed'}", repairable=False))
            break
    return found[:1]


def check_records(folder: str | Path) -> list[DamagedRecord]:
    """Every record of the search at ``folder`` that is damaged (each with what to do): the tool's own records, the
    study journal, Tune's state files, then whether they agree on the trials (only once each is whole)."""
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
    found += check_tune_state(folder)
    found += check_best(folder)
    return found or check_agreement(folder)


def repair_records(folder: str | Path) -> list[str]:
    """Mend what can be mended without loss (``--repair``); what was done, one line each. Raises the first
    DamagedRecord that cannot be mended, before anything is changed: damage of its own kind that cannot be rebuilt, a
    study journal that would still miss trials once its cut record is dropped (a cut longer than one record), or
    records that do not agree on the trials."""
    folder = Path(folder)
    found = [*(e for e in (_try(read_record, folder / n) for n in RECORDS) if e),
             *(e for e in [_try(check_journal, folder / STUDY_FILE)] if e), *check_tune_state(folder),
             *check_best(folder)]
    fatal = [d for d in found if not d.repairable]
    if fatal:
        raise fatal[0]
    journal = folder / STUDY_FILE
    if any(d.path == journal for d in found):
        data, lines = _journal_lines(journal)
        with tempfile.TemporaryDirectory() as tmp:  # the journal as the repair would leave it, checked first
            mended = Path(tmp) / "study.journal"
            mended.write_bytes(data[:len(data) - len(lines[-1])])
            disagree = check_agreement(folder, journal=mended)
    else:
        disagree = check_agreement(folder)
    disagree = [d for d in disagree if d.repair != RETELL]  # told again by the resume (search.searcher.mend_study)
    if disagree:
        raise disagree[0]
    done = []
    for d in found:
        rel = d.path.relative_to(folder).as_posix()
        if d.path == journal:
            done.append(f"{STUDY_FILE}: dropped a cut last record ({repair_journal(d.path)} bytes)")
        elif d.path.match(SEARCHER_STATE):
            order = scheduler_record(folder / SCHEDULER_FILE).get("order") or []
            write_json(d.path, {"study": STUDY_FILE, "asked": list(order)})
            done.append(f"{rel}: made again from the scheduler's order of the {len(order)} trials proposed")
        elif d.path == folder / BEST_DIR:

            shutil.rmtree(d.path)  # the search is then finished again by the resume: the same export, made again
            done.append(f"{BEST_DIR}/: removed ({d.why}); "
                        "the winner is exported again from its checkpoint")
        elif d.path.name == "params.json":
            config = next(t["config"] for t in tune_trials(folder) if t["dir"] == d.path.parent)
            write_json(d.path, config)
            done.append(f"{rel}: written again from Tune's experiment state")
        else:
            os.remove(d.path)
            done.append(f"{rel}: removed; {d.repair}")
    return done


def _try(check, path: Path) -> DamagedRecord | None:
    try:
        check(path)
    except DamagedRecord as e:
        return e
    return None


# ---------------------------------------------------------------------------------------------
# Moves: a copied or moved search writes into its own folder
# ---------------------------------------------------------------------------------------------
_moved: dict[str, str] = {}  # a folder the search was in before (search.json's ``folders``) -> where it is now


def folders_of(record: dict[str, Any] | None) -> list[str]:
    """Every folder the search recorded in ``record`` has been started or resumed in, first to last (``folders``; a
    search recorded before it kept them has only its last ``folder``)."""
    record = record or {}
    found = [f for f in record.get("folders") or [] if isinstance(f, str)]
    if isinstance(record.get("folder"), str) and record["folder"] not in found:
        found.append(record["folder"])
    return found


def relocate(recorded: list[str] | str | None, now: str) -> None:
    """The search once in each of the folders ``recorded`` is now at ``now``: every path into any of them that an
    object restored from Tune's pickles holds is re-pointed (:func:`here`), so a resume never writes into a folder it
    was copied from. Tune's ``tuner.pkl`` keeps the paths of the folder the search was started in, and its callback
    state those of the folder of its last session: both are re-pointed."""
    _moved.clear()
    for old in ([recorded] if isinstance(recorded, str) else list(recorded or [])):
        if old and not storage.is_uri(old) and os.path.normpath(old) != os.path.normpath(now):
            _moved[os.path.normpath(old)] = os.path.normpath(now)


def here(path: str | None) -> str | None:
    """``path`` re-pointed into the search's current folder where the search was copied or moved; else as it is."""
    if path is None:
        return None
    p = os.path.normpath(str(path))
    for old, new in sorted(_moved.items(), key=lambda kv: -len(kv[0])):  # the most specific first
        if p == old or p.startswith(old + os.sep):
            return new + p[len(old):]
    return str(path)
