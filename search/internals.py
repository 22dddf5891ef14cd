"""Where the search relies on Ray Tune's internals (checked against Ray 2.60): one place, each reliance named, each
with a test in ``tests/test_internals.py`` that fails in one line naming it where an upgrade changes it.

- **Cached decisions survive a restore.** Tune's controller keeps a scheduler decision taken while a trial's
  checkpoint was being saved (``TuneController._cached_trial_decisions``) and applies it once the save lands. The
  dict is part of the experiment state Tune saves (``__getstate__``), so a driver killed with such a save in flight
  leaves a STOP for a trial in the state; the restore reinstates it and applies it at the first checkpoint of the
  trial's retry, which then ends after one epoch and is recorded as complete. No public hook reaches it: a
  scheduler's ``on_trial_add`` (which Tune calls for every restored trial, after it has restored its own state)
  gets the controller behind ``TrialRunnerWrapper._tune_controller`` and forgets the trial's cached decision.
"""
from __future__ import annotations

CACHED_DECISIONS = "_cached_trial_decisions"  # TuneController: trial id -> a decision waiting for a save
WRAPPED_CONTROLLER = "_tune_controller"  # TrialRunnerWrapper: the controller a scheduler's hooks are given


def forget_cached_decision(tune_controller, trial_id: str) -> str | None:
    """Forget the decision Tune's controller cached for ``trial_id`` in an earlier session (a restored trial starts
    with none); the decision forgotten, or None. Does nothing where the controller has no such dict."""
    controller = getattr(tune_controller, "__dict__", {}).get(WRAPPED_CONTROLLER, tune_controller)
    cached = getattr(controller, "__dict__", {}).get(CACHED_DECISIONS)
    return cached.pop(trial_id, None) if isinstance(cached, dict) else None
