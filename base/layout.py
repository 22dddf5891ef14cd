"""Every file name of a search folder (``<storage>/<name>/``) and of a run's output folder (``run_akd.py --out``,
and ``best/``, which holds a run's outputs): this module is their one owner, and nothing else in the project writes one
out (``tests/test_runfolder.py`` reads the sources and says so). Tune's own names, which the project reads but never
writes, are defined with the rest of its reliance on Tune in ``base.internals`` and named here beside ours.

Our own files of a search live under ``akdtune/``: Tune re-uploads stale copies of top-level .json/.pkl files of the
experiment folder after a restore, which would overwrite them. Where the storage is local Tune writes its own files
through ``base.atomicfs`` (atomically).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from base import storage
from base.files import read_json
from base.internals import (  # Tune's names, fenced with the rest of the project's reliance on Tune
    CHECKPOINT_PREFIX as CHECKPOINT_PREFIX,
)
from base.internals import (
    EXPERIMENT_STATE as EXPERIMENT_STATE,
)
from base.internals import (
    SEARCHER_STATE as SEARCHER_STATE,
)
from base.internals import (
    TRIAL_ERROR as TRIAL_ERROR,
)
from base.internals import (
    TRIAL_PARAMS as TRIAL_PARAMS,
)
from base.internals import (
    TRIAL_PREFIX as TRIAL_PREFIX,
)
from base.internals import (
    TUNE_RESULTS as TUNE_RESULTS,
)
from base.internals import (
    TUNE_STATE as TUNE_STATE,
)
from base.internals import (
    TUNER_FILE as TUNER_FILE,
)

# ---------------------------------------------------------------------------------------------
# A run's output folder (run_akd.py --out; best/ holds the same files for the winner)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FILE = "checkpoint.pt"  # a run's state: in a run's --out folder, in each of Tune's checkpoint folders
RUN_CONFIG = "config.json"  # the run's settings, its student's resolved width included
RUN_FINAL = "final.json"  # a run's final metrics (run_akd.py)
RUN_EPOCHS = "metrics.jsonl"  # a run's metrics, one JSON line per epoch (run_akd.py)
STUDENT_WEIGHTS = "student.pt"  # the student's state dict (torch.load(..., weights_only=True))
STUDENT_PROGRAM = "student.pt2"  # the student as an exported program (torch.export.load)
STUDENT_ONNX = "student.onnx"  # the student in ONNX, where the onnx extra is installed
GENERATED_GRID = "generated.png"  # a grid of the generator's images, one row per class the teacher sees
CONFUSION_TABLE = "confusion_test.csv"  # rows: true class, columns: predicted (labelled tasks)

# ---------------------------------------------------------------------------------------------
# A search folder: the tool's own files
# ---------------------------------------------------------------------------------------------
META_FILE = "akdtune/search.json"  # how the search was started (space, task, teacher, seed, ...)
SCHEDULER_FILE = "akdtune/scheduler.json"  # rung records, stop decisions, finished trials (search.scheduler)
STUDY_FILE = "akdtune/study.journal"  # the Optuna study (Optuna's journal storage); optuna.load_study reads it
CONFIRM_DIR = "confirm"  # the confirmation phase: a Ray experiment of its own, inside the search folder
CONFIRM_PLAN = "akdtune/confirm.json"  # candidates and seeds of the confirmation phase
CONFIRM_RESULTS = "akdtune/confirmed.json"  # per candidate: seeds, val/test accuracy per seed, mean and std
RESULTS_DIR = "akdtune/results"  # every result each search trial reported: <trial id>.jsonl (append_result)
LOCK_FILE = "akdtune/driver.lock"  # a local search: flock'ed by its driver, names it (search.lease)
LEASE_DIR = "akdtune/lease"  # a search on a URI: each driver's claim or lease, <token>.json (search.lease)
LIVE_REPORT_FILE = "akdtune/live_report.json"  # how often and how long the live report was rewritten
SUMMARY_DIR = "summary"  # trials.parquet, epochs.parquet (results.summary.write_summaries)
REPORT_FILE = "report.html"  # results.report.build_report
BEST_DIR = "best"  # the winner: a run's outputs (RUN_* and STUDENT_* above), metrics.json, trial.json
BEST_METRICS = "best/metrics.json"  # the winner's confirmed metrics
BEST_TRIAL = "best/trial.json"  # which trial and checkpoint it is
BEST_MANIFEST = "best/manifest.json"  # every other file of best/ (size, sha256) and the winner checkpoint's
BEST_PARTIAL = "akdtune/best.partial"  # best/ while it is written; renamed to best/ once complete, so a search
# killed during its export has no best/ and is not finished (the resume exports again)
TRIALS_TABLE = f"{SUMMARY_DIR}/trials.parquet"
EPOCHS_TABLE = f"{SUMMARY_DIR}/epochs.parquet"

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
        if m and (d / CHECKPOINT_FILE).is_file():
            found.append((int(m.group(1)), d / CHECKPOINT_FILE))
    return max(found)[1] if found else None


def best_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exported winner's ``best/metrics.json`` and ``best/trial.json`` ({} each where there is none yet)."""
    return read_json(Path(folder) / BEST_METRICS, {}), read_json(Path(folder) / BEST_TRIAL, {})
