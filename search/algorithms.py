"""Searcher and scheduler: two fixes over Ray's stock OptunaSearch + ASHA.

1. ``PruneAwareOptunaSearch`` tells Optuna that a trial ASHA stopped was PRUNED (its intermediate
   values kept), where the stock integration records it as COMPLETE with its low-fidelity score,
   which misleads TPE into treating a 4-epoch score as a final one. Errored trials are FAIL even
   when they reported a result before failing.
2. ``PersistentASHA`` + ``SearchStateCallback``: the scheduler's rung records are saved with
   every experiment checkpoint (as callback state) and put back on ``Tuner.restore``, which
   otherwise restarts ASHA with empty rungs, so a resumed search would promote trials that the
   original rungs would have stopped.

Everything here lives in an importable module because Ray pickles it for restore.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from trainable import metrics as M

log = logging.getLogger(__name__)


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records ASHA-stopped trials as PRUNED and errored trials as FAIL.

    Args:
        scheduler: the search's ``PersistentASHA``; its stop decisions say which trials were
            pruned (a trial that stops by its own patience, or at max_epochs, is COMPLETE).
    """

    def __init__(self, *args, scheduler: "PersistentASHA", **kwargs):
        super().__init__(*args, **kwargs)
        self.scheduler = scheduler

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if not result and trial_id in self.scheduler.finished:  # finished before a driver crash
            result = self.scheduler.finished[trial_id]
        pruned = not error and trial_id in self.scheduler.stopped_trials
        if not error and not pruned:
            super().on_trial_complete(trial_id, result, error)
            return
        ot_trial = self._ot_trials[trial_id]
        if error:
            state = optuna.trial.TrialState.FAIL
        else:
            state = optuna.trial.TrialState.PRUNED  # Optuna keeps the last intermediate value
            if not isinstance(self.metric, list) and result and self.metric in result:
                # Tune does not pass the stopping result to on_trial_result: record the value ASHA judged.
                ot_trial.report(result[self.metric], int(result.get(M.EPOCH, result.get("training_iteration", 0))))
        try:
            self._ot_study.tell(ot_trial, state=state)
        except Exception as exc:  # e.g. told twice after a restore
            log.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        # Report by epoch (not Tune's iteration counter) so resumed trials keep their steps.
        self._ot_trials[trial_id].report(result[self.metric], int(result.get(M.EPOCH, result["training_iteration"])))

    def save(self, checkpoint_path: str) -> None:
        # The scheduler is saved by SearchStateCallback; pickling it here too would detach the
        # restored searcher from the live scheduler.
        import pickle

        state = self.__dict__.copy()
        state.pop("scheduler", None)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)


class PersistentASHA(ASHAScheduler):
    """ASHA whose rung records survive a restore, and which never re-runs a finished trial.

    Its state (rung records, the trials it stopped, the final metrics of every finished trial) is
    exported with each Tune experiment checkpoint (``SearchStateCallback``) and mirrored to
    ``state_file`` after every change. Tune's experiment checkpoint lags behind events; the
    mirror does not. On restore both are merged, and a trial that Tune's checkpoint still thinks
    unfinished but that the mirror records as finished is marked finished instead of re-run, so
    a driver killed at any moment resumes without changing any finished trial.
    """

    def __init__(self, *args, state_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_file = state_file
        self.stopped_trials: list[str] = []  # cut short by ASHA (before max_t)
        self.finished: dict[str, dict[str, float]] = {}  # trial id -> its final metrics

    # -- state
    def export_state(self) -> dict[str, Any]:
        return {
            "rungs": [[[float(m), dict(rec)] for m, rec in b._rungs] for b in self._brackets],
            "trial_bracket": {tid: self._brackets.index(b) for tid, b in self._trial_info.items()},
            "num_stopped": self._num_stopped,
            "stopped_trials": list(self.stopped_trials),
            "finished": dict(self.finished),
        }

    def import_state(self, state: dict[str, Any]) -> None:
        """Restore from a checkpointed state, merged with the (newer) mirror file when present."""
        states = [state]
        if self.state_file and os.path.exists(self.state_file):
            try:
                with open(self.state_file) as f:
                    states.append(json.load(f))
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable ASHA mirror %s: %s", self.state_file, exc)
        for st in states:  # later states win; records are only ever added
            for bracket, rungs in zip(self._brackets, st["rungs"]):
                by_milestone = {float(m): rec for m, rec in rungs}
                bracket._rungs = [(m, {**rec, **by_milestone.get(float(m), {})}) for m, rec in bracket._rungs]
            for tid, idx in st["trial_bracket"].items():
                self._trial_info.setdefault(tid, self._brackets[idx])
            self._num_stopped = max(self._num_stopped, st["num_stopped"])
            self.stopped_trials += [t for t in st["stopped_trials"] if t not in self.stopped_trials]
            self.finished.update(st.get("finished", {}))

    def rung_records(self) -> list[list[tuple[float, dict[str, float]]]]:
        return [[(m, dict(rec)) for m, rec in b._rungs] for b in self._brackets]

    def _mirror(self) -> None:
        if not self.state_file:
            return
        try:
            tmp = f"{self.state_file}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.export_state(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.state_file)
        except OSError as exc:  # e.g. remote storage: the callback state still holds it
            log.debug("cannot mirror ASHA state: %s", exc)

    # -- scheduler hooks
    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING and trial.trial_id in self.finished:
                tune_controller.stop_trial(trial)  # finished before the driver died: do not re-run
        return super().choose_trial_to_run(tune_controller)

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id not in self._trial_info:  # a trial resumed after restore
            self._trial_info[trial.trial_id] = self._brackets[0]
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.stopped_trials.append(trial.trial_id)  # cut short; stopping at max_t is finishing
        self._mirror()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        if trial.trial_id not in self._trial_info:
            self._trial_info[trial.trial_id] = self._brackets[0]
        super().on_trial_complete(tune_controller, trial, result)
        if result:
            self.finished[trial.trial_id] = {k: result[k] for k in M.EPOCH_METRICS if k in result}
        self._mirror()

    def on_trial_remove(self, tune_controller, trial):
        self._trial_info.pop(trial.trial_id, None)


class SearchStateCallback(Callback):
    """Carries ``PersistentASHA``'s state through Tune's experiment checkpoints; exports the study.

    Tune saves callback state together with the searcher's at every experiment checkpoint and
    restores it on ``Tuner.restore``; the scheduler, the searcher and this callback are pickled
    together in the tuner state, so after a restore they are still the same objects.

    After every finished trial the Optuna study is also written to ``study_file`` as plain JSON
    (``export_study``), so that summaries and reports can rebuild it without unpickling anything.
    """

    def __init__(self, scheduler: PersistentASHA, searcher: PruneAwareOptunaSearch, study_file: str | None = None):
        self.scheduler = scheduler
        self.searcher = searcher
        self.study_file = study_file

    def get_state(self) -> dict | None:
        return {"asha": json.dumps(self.scheduler.export_state())}

    def set_state(self, state: dict) -> None:
        if state and "asha" in state:
            self.scheduler.import_state(json.loads(state["asha"]))

    def _export(self) -> None:
        if not self.study_file or self.searcher._ot_study is None:
            return
        try:
            tmp = f"{self.study_file}.tmp"
            with open(tmp, "w") as f:
                json.dump(export_study(self.searcher), f, indent=1, sort_keys=True)
            os.replace(tmp, self.study_file)
        except OSError as exc:
            log.debug("cannot export the study: %s", exc)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._export()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._export()

    def on_experiment_end(self, trials, **info):
        self._export()


def export_study(searcher: OptunaSearch) -> dict[str, Any]:
    """The searcher's Optuna study as JSON-able data (rebuilt by ``results.study.rebuild_study``)."""
    from optuna.distributions import distribution_to_json

    study = searcher._ot_study
    ray_ids = {t.number: tid for tid, t in searcher._ot_trials.items()}
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({
            "number": t.number,
            "ray_trial_id": ray_ids.get(t.number),
            "state": t.state.name,
            "params": t.params,
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "values": t.values,
            "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
        })
    return {"directions": [d.name for d in study.directions], "metric": searcher.metric, "trials": trials}


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default embeds every hyperparameter)."""
    return f"trial_{trial.trial_id}"
