"""The files of a search folder ``<storage>/<name>/`` that this tool owns, named and written in one place.

Our own files live under ``akdtune/``: Tune re-uploads stale copies of top-level .json/.pkl files
of the experiment folder after a restore, which would overwrite them. Every file is written
atomically (a temporary file, then ``os.replace``): a kill never leaves a half-written one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

META_FILE = "akdtune/search.json"  # how the search was started (space, task, teacher, seed, ...)
SCHEDULER_FILE = "akdtune/scheduler.json"  # rung records, stop decisions, finished trials (search.scheduler)
STUDY_FILE = "akdtune/study.journal"  # the Optuna study (Optuna's journal storage); optuna.load_study reads it
STUDY_NAME = "akdtune"  # the study's name inside STUDY_FILE
CONFIRM_DIR = "confirm"  # the confirmation phase: a Ray experiment of its own, inside the search folder
CONFIRM_PLAN = "akdtune/confirm.json"  # candidates and seeds of the confirmation phase
CONFIRM_RESULTS = "akdtune/confirmed.json"  # per candidate: seeds, val/test accuracy per seed, mean and std


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (parents created)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=_jsonable) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, tuple)):
        return list(v)
    if hasattr(v, "item"):  # numpy / torch scalars
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
