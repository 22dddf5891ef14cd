"""The Optuna study's journal (``akdtune/study.journal``): the one way it is opened, checked whole before anything
appends to it, its cut last record dropped (``--repair``), and a stale lock of a killed writer removed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from base import storage
from results.recordfile import DamagedRecord

STUDY_NAME = "akdtune"  # the study's name inside the journal
RAY_ID = "ray_trial_id"  # the Optuna user attribute naming a study trial's Ray trial


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


def journal_lines(path: str | Path) -> tuple[bytes, list[bytes]]:
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
    data, lines = journal_lines(path)
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
    data, lines = journal_lines(path)
    if not lines[-1]:
        return 0
    keep = len(data) - len(lines[-1])
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def newest_by_ray_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Each Ray trial's newest record in ``study``, by its Ray id (a trial a resume trained again after it errored
    has its FAIL record and the retry's)."""
    return {str(t.user_attrs[RAY_ID]): t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if RAY_ID in t.user_attrs}


def study_ray_ids(path: str | Path) -> set[str] | None:
    """The Ray trial ids of the study in the journal at ``path`` (None where there is no study yet)."""
    study = open_study(path)
    if study is None:
        return None
    return {str(t.user_attrs[RAY_ID]) for t in study.get_trials(deepcopy=False) if RAY_ID in t.user_attrs}
