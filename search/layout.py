"""The files of a search folder ``<storage>/<name>/`` that this tool owns, named and written in one place.

Our own files live under ``akdtune/``: Tune re-uploads stale copies of top-level .json/.pkl files
of the experiment folder after a restore, which would overwrite them. Every file is written
through ``trainable.files`` (atomically: a kill never leaves a half-written one). Tune's own files
(``experiment_state-*.json``, ``tuner.pkl``, trial folders) are Tune's.
"""
from __future__ import annotations

import os

META_FILE = "akdtune/search.json"  # how the search was started (space, task, teacher, seed, ...)
SCHEDULER_FILE = "akdtune/scheduler.json"  # rung records, stop decisions, finished trials (search.scheduler)
STUDY_FILE = "akdtune/study.journal"  # the Optuna study (Optuna's journal storage); optuna.load_study reads it
STUDY_NAME = "akdtune"  # the study's name inside STUDY_FILE
CONFIRM_DIR = "confirm"  # the confirmation phase: a Ray experiment of its own, inside the search folder
CONFIRM_PLAN = "akdtune/confirm.json"  # candidates and seeds of the confirmation phase
CONFIRM_RESULTS = "akdtune/confirmed.json"  # per candidate: seeds, val/test accuracy per seed, mean and std
LIVE_REPORT_FILE = "akdtune/live_report.json"  # how often and how long the live report was rewritten
SUMMARY_DIR = "summary"  # trials.parquet, epochs.parquet (results.summary.write_summaries)
REPORT_FILE = "report.html"  # results.report.build_report
BEST_DIR = "best"  # the winner: a run's outputs (trainable.outputs.finish_run), metrics.json, trial.json
BEST_METRICS = "best/metrics.json"  # the winner's confirmed metrics
BEST_TRIAL = "best/trial.json"  # which trial and checkpoint it is
BEST_PARTIAL = "akdtune/best.partial"  # best/ while it is written; renamed to best/ once complete, so a search
# killed during its export has no best/ and is not finished (the resume exports again)



# A search folder may be copied or moved and resumed from its new place. The folder a search recorded as its own
# (search.json's ``folder``) -> where it is now; set by the driver before Tune restores the objects it pickled.
_moved: dict[str, str] = {}


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
