"""The scheduler's record (``akdtune/scheduler.json``) as plain data: its schema, read with its checksum checked."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from results.recordfile import read_record

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
