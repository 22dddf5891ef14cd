"""Glue between Tune and the search's own scheduler state (importable: Ray pickles it for restore).

The searcher (``search.searcher.OptunaSearcher``) and the scheduler (``search.scheduler.RungScheduler``)
keep their records in files of the run folder. Where the storage is not a local folder (a URI), the
scheduler has no file; ``SearchStateCallback`` then carries its state through Tune's experiment
checkpoints (callback state), which ``Tuner.restore`` gives back.
"""
from __future__ import annotations

import json

from ray.tune import Callback


class SearchStateCallback(Callback):
    """Saves the scheduler's state with Tune's experiment checkpoints and gives it back on restore."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return {"scheduler": json.dumps(self.scheduler.state)}

    def set_state(self, state: dict) -> None:
        if state and "scheduler" in state:
            self.scheduler.merge_state(json.loads(state["scheduler"]))


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default embeds every hyperparameter)."""
    return f"trial_{trial.trial_id}"
