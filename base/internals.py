"""Where the search relies on Ray Tune's and Optuna's internals (checked against Ray 2.60 and Optuna 5.0): one place,
each reliance named, each with a test in ``tests/test_internals.py`` that fails in one line naming it where an
upgrade changes it. Everything else builds on their public interfaces. Nothing here imports Ray: the functions are
handed Tune's objects, so ``results/`` (which runs without Ray) reads Tune's files through the same names.

- **Tune's layout of an experiment folder** (which the project reads, never writes): ``tuner.pkl``, one
  ``experiment_state-*.json`` (and ``search_gen_state-*``, ``searcher-state-*``, ``callback-states-*``) per session,
  the newest by name the one a resume restores; ``trial_<id>/`` folders (the name the search gives them), each with
  ``params.json``, ``result.json``, ``error.txt`` and ``checkpoint_NNNNNN/`` folders. ``base.layout`` names them beside
  the project's own files.
- **Tune's upload order**: where the storage is local, Tune writes each of these files by a copy through pyarrow, and
  deletes an older checkpoint folder as a whole; ``base.atomicfs`` makes each write atomic on that assumption
  (``CHECKPOINT_DIR``), and ``base.storage.Mirror`` recognises checkpoint folders by the same name.

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
import re
from typing import Any

# Tune's layout of an experiment folder
TUNER_FILE = "tuner.pkl"  # written when a search starts: the search exists from then on
EXPERIMENT_STATE_PREFIX = "experiment_state-"  # how the name of Tune's experiment state (what a resume reads) starts
EXPERIMENT_STATE = f"{EXPERIMENT_STATE_PREFIX}*.json"  # one per session; the newest is the one a resume restores
SEARCHER_STATE = "searcher-state-*.pkl"  # the searcher's saved state (ours holds JSON: search.searcher.OptunaSearcher)
TUNE_STATE = (EXPERIMENT_STATE, "search_gen_state-*.json", SEARCHER_STATE, "callback-states-*.pkl")  # per session
TRIAL_PREFIX = "trial_"  # trial folders: trial_<id> (search.callbacks.trial_dirname)
TRIAL_PARAMS = "params.json"  # in a trial folder: Tune's copy of the trial's config
TUNE_RESULTS = "result.json"  # in a trial folder: Tune's copy of its results
TRIAL_ERROR = "error.txt"  # in a trial folder: the traceback of its last failure
CHECKPOINT_PREFIX = "checkpoint_"  # in a trial folder: checkpoint_000000, checkpoint_000001, ...
CHECKPOINT_DIR = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")  # a checkpoint folder's name, its number

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
    import optuna  # noqa: PLC0415 - the ground floor loads Optuna only for the search, never for a run
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    return optuna.trial.Trial(study, tid)
