"""Where the search relies on Ray Tune's and Optuna's internals (checked against Ray 2.60 and Optuna 5.0): one place,
each reliance named, each with a test in ``tests/test_internals.py`` that fails in one line naming it where an
upgrade changes it. Everything else builds on their public interfaces. Tune's file names in a search folder
(``experiment_state-*.json``, ``tuner.pkl``, ``checkpoint_000000``, ...) are named once in ``results.record`` and
pinned by the same tests.

- **Cached decisions survive a restore.** Tune's controller keeps a scheduler decision taken while a trial's
  checkpoint was being saved (``TuneController._cached_trial_decisions``) and applies it once the save lands. The
  dict is part of the experiment state Tune saves (``__getstate__``), so a driver killed with such a save in flight
  leaves a STOP for a trial in the state; the restore reinstates it and applies it at the first checkpoint of the
  trial's retry, which then ends after one epoch and is recorded as complete. No public hook reaches it: a
  scheduler's ``on_trial_add`` (which Tune calls for every restored trial, after it has restored its own state)
  gets the controller behind ``TrialRunnerWrapper._tune_controller`` and forgets the trial's cached decision.
- **A restored search generator agrees with the trials Tune restored.** Tune copies its state files one by one, so
  a kill can leave the generator's state (its count of trials made, whether it has finished) and the concurrency
  limiter's (the trials it counts as running) out of step with the experiment state. ``SearchGenerator`` and
  ``ConcurrencyLimiter`` offer ``get_state``/``set_state`` publicly, but the keys of those dicts are theirs:
  ``counter``, ``finished``; ``live_trials``, ``num_unfinished_live_trials``.
- **A restored generator's storage is re-pointed.** Tune re-points the trials it restores when a search folder was
  copied or moved, but not the ``StorageContext`` kept in the generator's state (``state["experiment"].storage``:
  ``experiment_fs_path``, ``storage_fs_path``, ``experiment_dir_name``), so trials made after the restore of a
  copy would write into the original.
- **An Optuna trial still running after a restore** is reached as ``optuna.trial.Trial(study, trial_id)`` with the
  storage's id of the trial (``get_trial_id_from_study_id_trial_number``): Optuna's ask/tell offers a running
  trial only to the process that asked for it.
"""
from __future__ import annotations

import os
from typing import Any

import optuna

CACHED_DECISIONS = "_cached_trial_decisions"  # TuneController: trial id -> a decision waiting for a save
WRAPPED_CONTROLLER = "_tune_controller"  # TrialRunnerWrapper: the controller a scheduler's hooks are given


def forget_cached_decision(tune_controller, trial_id: str) -> str | None:
    """Forget the decision Tune's controller cached for ``trial_id`` in an earlier session (a restored trial starts
    with none); the decision forgotten, or None. Does nothing where the controller has no such dict."""
    controller = getattr(tune_controller, "__dict__", {}).get(WRAPPED_CONTROLLER, tune_controller)
    cached = getattr(controller, "__dict__", {}).get(CACHED_DECISIONS)
    return cached.pop(trial_id, None) if isinstance(cached, dict) else None


GENERATOR_COUNTER, GENERATOR_FINISHED = "counter", "finished"  # SearchGenerator.get_state()
LIMITER_LIVE, LIMITER_UNFINISHED = "live_trials", "num_unfinished_live_trials"  # ConcurrencyLimiter.get_state()
STORAGE_FIELDS = ("experiment_fs_path", "storage_fs_path", "experiment_dir_name")  # StorageContext


def generator_made(state: dict[str, Any], count: int) -> dict[str, Any]:
    """A search generator's state saying it has made ``count`` trials and is not finished."""
    return {**state, GENERATOR_COUNTER: count, GENERATOR_FINISHED: False}


def limiter_running(state: dict[str, Any], live: set[str]) -> dict[str, Any]:
    """A concurrency limiter's state counting the trials ``live`` as running."""
    return {**state, LIMITER_LIVE: set(live), LIMITER_UNFINISHED: len(live)}


def repoint_generator(state: dict[str, Any], folder: str) -> None:
    """Make the experiment kept in a search generator's ``state`` write its trials into ``folder`` (a search folder
    copied or moved since it was saved)."""
    storage = state["experiment"].storage
    parent, name = os.path.split(os.path.normpath(folder))
    if os.path.normpath(storage.experiment_fs_path) != os.path.normpath(folder):
        storage.storage_fs_path, storage.experiment_dir_name = parent, name


def running_trial(study, storage, number: int):
    """The running Optuna trial ``number`` of ``study`` (whose storage is ``storage``), to report to and tell, from
    any process."""
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    return optuna.trial.Trial(study, tid)
