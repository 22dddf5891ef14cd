"""The search's Tune callbacks and folder names (importable: Ray pickles them for restore): the scheduler's state
carried through Tune's checkpoints, every trial result logged into the search folder, the search's wall time kept
current, short trial folder names.

The searcher (``search.searcher.OptunaSearcher``) and the scheduler (``search.scheduler.RungScheduler``)
keep their records in files of the run folder (for a search on a URI, in the driver's working copy, each file
uploaded as it changes). ``SearchStateCallback`` also carries the scheduler's state through Tune's experiment
checkpoints (callback state), which ``Tuner.restore`` gives back.
"""
from __future__ import annotations

import json
import os
import time

from ray.tune import Callback

from base import metrics as M
from base.layout import trial_folder_name
from base.storage import push_changed
from results.moves import here
from results.recordfile import DamagedRecord, read_record, write_record
from results.resultlog import append_result


class SearchStateCallback(Callback):
    """Saves the scheduler's state with Tune's experiment checkpoints and gives it back on restore."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return {"scheduler": json.dumps(self.scheduler.state)}

    def set_state(self, state: dict) -> None:
        # A local search's scheduler has its own file, the record: Tune's copy comes from its driver's staging
        # folder, which a copy of the search folder resumed on the same cluster shares, and may be another's.
        if state and "scheduler" in state and not self.scheduler.state_file:
            self.scheduler.merge_state(json.loads(state["scheduler"]))


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default embeds every hyperparameter)."""
    return trial_folder_name(trial.trial_id)


class ResultLog(Callback):
    """Appends every result a search trial reports to ``akdtune/results/<trial id>.jsonl``, as it arrives
    (``results.resultlog.append_result``: Tune's ``result.json`` loses the lines reported just before a pause)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.folder = here(self.folder)  # a copied or moved search writes into its new folder

    def on_trial_result(self, iteration, trials, trial, result, **info):
        append_result(self.folder, trial.trial_id, result)


class WallClock(Callback):
    """Keeps ``wall_s`` of the search record current while trials run, so a kill -9 loses at most a few
    seconds of it: the search's wall time is the sum over its sessions (the first run and each resume).

    ``run_search`` marks each session's start in the record (``session_started``, ``wall_before``).
    """

    def __init__(self, meta_file: str, every_s: float = 5.0):
        self.meta_file = meta_file
        self.every_s = every_s
        self._last = 0.0

    def __getstate__(self):
        return {"meta_file": self.meta_file, "every_s": self.every_s, "_last": 0.0}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.meta_file = here(self.meta_file)  # a copied or moved search writes into its new folder

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        update_wall(self.meta_file)
        push_changed(os.path.dirname(os.path.dirname(self.meta_file)))  # a URI's working copy: the live report too

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tick()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tick(force=True)


def update_wall(meta_file: str) -> float:
    """Set ``wall_s`` of the search record to the time before this session plus this session's time."""
    try:
        meta = read_record(meta_file)
    except DamagedRecord:  # changed behind the search's back: left as it is (a resume or the report says so)
        return 0.0
    if not meta or "session_started" not in meta:
        return 0.0
    meta[M.WALL_S] = float(meta.get("wall_before", 0.0)) + (time.time() - float(meta["session_started"]))
    write_record(meta_file, meta)
    return meta[M.WALL_S]
