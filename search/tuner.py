"""The Ray Tune experiments of a search, built from its ``SearchPlan``: the trainable with the teacher attached,
the search's ``tune.Tuner`` (``build_tuner``, ``restore_tuner``) and the confirmation's (``confirm_tuner``).

What comes before (the teacher, the checks, the speed) is ``search.prepare``; where trials run, ``search.cluster``;
the Tune callbacks, ``search.callbacks``. Nothing here decides a setting: the plan has them all.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from base import storage
from base.atomicfs import HELD, atomic_local_filesystem, holding_filesystem
from base.internals import generator_made, limiter_running, repoint_generator
from base.layout import META_FILE, SCHEDULER_FILE, STUDY_FILE, has_tune_state, tune_started
from results.journal import STUDY_NAME
from results.moves import here
from results.tunefiles import tune_trials
from search.callbacks import ResultLog, SearchStateCallback, WallClock, trial_dirname
from search.cluster import gpus_per_trial, trial_threads, trials_at_once
from search.plan import SearchPlan
from search.prepare import Teacher
from search.progress import SearchProgress
from search.scheduler import ConfirmScheduler, RungScheduler, milestones, retry_errored
from search.searcher import OptunaSearcher, reopen_for_retry
from trainable.tune_trainable import RUN, akd_trial, teacher_payload

URI_SYNC_PERIOD_S = 5  # how often Tune uploads its experiment state to a URI storage


def make_trainable(plan: SearchPlan, teacher: Teacher, speed):
    """``akd_trial`` with the teacher, the data and the measured ``speed`` attached (shipped once through the
    object store) and resources."""
    return tune.with_resources(
        tune.with_parameters(akd_trial, teacher=teacher_payload(teacher.model, teacher.arch), data=teacher.data,
                             task=plan.task_spec,
                             threads=trial_threads(plan), data_root=plan.data_root, speed=speed.record(),
                             search_dir=plan.path),
        resources={"cpu": plan.cpus_per_trial, "gpu": gpus_per_trial(plan)})


def _run_config(plan: SearchPlan, name: str, storage: str, callbacks: list):
    path, fs = _tune_storage(plan, storage)
    return tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                          callbacks=[*callbacks, WallClock(str(plan.file(META_FILE)))],
                          # a URI: Tune's experiment state is uploaded every few seconds (Tune's default: 5 minutes),
                          # so a resume on another driver loses little
                          sync_config=tune.SyncConfig(sync_period=URI_SYNC_PERIOD_S) if not plan.local else None,
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                          failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                          verbose=1 if plan.verbose else 0)


def fit(tuner) -> None:
    """Run ``tuner`` to its end, then delete the older checkpoints whose deletion was held while a resume could
    still need them (``base.atomicfs.HeldDeletions``): the experiment's last state is written."""
    tuner.fit()
    HELD.release()


def search_progress(plan: SearchPlan):
    """The compact live view of the search's trials (and the live report where the storage is local)."""
    rungs = milestones(plan.grace_period, plan.reduction_factor, plan.max_epochs) if plan.early_stopping else []
    return SearchProgress(plan.num_samples, plan.max_epochs, rungs, plan.reduction_factor, plan.space.limits,
                          [p.name for p in plan.space.params],
                          state_file=str(plan.file(SCHEDULER_FILE)), study_file=str(plan.file(STUDY_FILE)),
                          report_dir=plan.folder if plan.report and plan.report_every_s > 0 else None,
                          report_every_s=plan.report_every_s,
                          # each candidate's own seed mostly exists already: the extra seeds are the work left
                          confirm_runs=plan.confirm_top_k * max(1, plan.confirm_seeds - 1),
                          selection=plan.selection_metric)


def _tune_storage(plan: SearchPlan, where: str):
    """(path, ``pyarrow.fs`` filesystem) that Tune is given for ``where``. Local storage: the path, on the local disk
    with every file Tune copies there written atomically (a kill in the middle of a copy leaves the old file or the
    new one). A URI: the path inside the URI's filesystem, which writes each object whole by one PUT, with Tune's
    deletions of older checkpoints held there too (``base.atomicfs.HoldingFS``)."""
    if plan.local:
        return where, atomic_local_filesystem()
    fs, path = storage.filesystem(where)
    return path, holding_filesystem(fs)


def _restore(plan: SearchPlan, path: str, trainable, resume_errored: bool = False):
    path, fs = _tune_storage(plan, path)
    return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=resume_errored,
                              restart_errored=False, storage_filesystem=fs)


def _in_this_folder():
    """Tune's ``SearchGenerator`` (the wrapper that makes a trial of each of our searcher's settings), restored from
    the search's own folder and making its trials there.

    - Tune restores the generator and our searcher from its driver's staging folder, which is named by the
      experiment's name and first start time only: a copy of a folder and its original resumed on one Ray cluster
      share it, and the one resumed second read the other's searcher state (its trials, its order). The search
      folder itself holds this search's own state: that is what is read.
    - Tune re-points the trials it restores when a search folder was copied or moved, but not the storage kept in
      the generator's own state: without this, every trial made after the restore of a copy wrote its checkpoints
      into the folder it was copied from."""

    class InThisFolder(SearchGenerator):
        def __init__(self, searcher, folder: str, repoint: bool = True):
            super().__init__(searcher)
            self.folder, self.repoint = folder, repoint  # repoint: the folder is where Tune writes (local storage)

        def __reduce__(self):  # pickled into tuner.pkl as its searcher and folder; restored where the folder is now
            return (_restored_generator, (self.searcher, self.folder, self.repoint))

        def restore_from_dir(self, dirpath: str) -> None:
            own = self.folder if self.has_checkpoint(self.folder) else dirpath
            super().restore_from_dir(own)
            self._agree_with_tune()

        def _agree_with_tune(self) -> None:
            """Tune copies its state files one by one: a kill in the middle of a copy can leave the generator's and
            the searcher's state newer (or older) than the experiment state Tune restores its trials from. What was
            proposed is made to be what Tune restored: the searcher's proposals, the count of trials made and the
            trials the concurrency limit counts as running."""
            if not has_tune_state(self.folder):
                return
            trials = {t["trial_id"]: t["status"] for t in tune_trials(self.folder)}
            searcher, limiter = self.searcher, None
            while hasattr(searcher, "searcher"):
                limiter = searcher if isinstance(searcher, ConcurrencyLimiter) else limiter
                searcher = searcher.searcher
            if hasattr(searcher, "agree_with"):
                searcher.agree_with(list(trials))
            self.set_state(generator_made(self.get_state(), len(trials)))
            if limiter is not None:  # an errored trial is live: the resume retries it (resume_errored), and the
                # limiter passes on only a live trial's end, so the study is told how its retry ended
                live = {t for t, status in trials.items() if status != "TERMINATED"}
                limiter.set_state(limiter_running(limiter.get_state(), live))

        def set_state(self, state: dict) -> None:
            super().set_state(state)
            if self.repoint:
                repoint_generator(state, self.folder)

    return InThisFolder


def _restored_generator(searcher, folder: str, repoint: bool = True):
    return _in_this_folder()(searcher, here(folder), repoint)


def _search_algorithm(searcher, plan: SearchPlan, max_concurrent: int | None):
    """Our searcher as Tune runs it: limited to ``max_concurrent`` trials at once (what Tune does itself for
    ``max_concurrent_trials``), in a generator that restores from the search's own files (in its folder, or the
    working copy of a search on a URI) and keeps new trials in the search's current folder (local storage)."""
    wrapped = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher
    return _in_this_folder()(wrapped, plan.folder, plan.local)


def build_tuner(plan: SearchPlan, trainable, check=None):
    """A new search: our Optuna searcher (refusing settings over the budget with ``check``, a
    ``BudgetCheck``) and rung scheduler, ``num_samples`` trials."""
    repeatable, at_once = not plan.asynchronous, trials_at_once(plan)
    scheduler = RungScheduler(plan.objectives, max_epochs=plan.max_epochs, grace_period=plan.grace_period,
                              reduction_factor=plan.reduction_factor, limits=plan.space.limits,
                              early_stopping=plan.early_stopping,
                              state_file=str(plan.file(SCHEDULER_FILE)), repeatable=repeatable)
    searcher = OptunaSearcher(plan.space.params, plan.objectives, plan.seed, plan.num_samples,
                              study_path=str(plan.file(STUDY_FILE)), study_name=STUDY_NAME,
                              scheduler=scheduler, limits=plan.space.limits, budget_check=check,
                              repeatable=repeatable, concurrency=at_once)
    plan.file(STUDY_FILE).parent.mkdir(parents=True, exist_ok=True)
    if plan.resume:
        print(f"resuming {plan.path}: stopped before Ray Tune saved any of its state, so its trials start again")
    storage = plan.storage if not plan.local else str(Path(plan.path).parent)
    return tune.Tuner(
        trainable, param_space=plan.trial_config,
        tune_config=tune.TuneConfig(
            search_alg=_search_algorithm(searcher, plan, at_once if repeatable else (plan.max_concurrent or None)),
            scheduler=scheduler, num_samples=plan.num_samples, trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=_run_config(plan, plan.name, storage, [SearchStateCallback(scheduler), search_progress(plan),
                                                          ResultLog(plan.folder)]))


def tune_saved_state(plan: SearchPlan) -> bool:
    """Whether Tune saved a state of the search to restore. A search killed before Tune's first save has none: Tune
    would start it again from ``tuner.pkl`` alone, which keeps neither the trials' config nor their number, so the
    search's trials are started again by a new Tuner instead."""
    return has_tune_state(plan.folder)  # a URI's: the working copy holds what was downloaded of Tune's state


def restore_tuner(plan: SearchPlan, trainable):
    """The interrupted search, as Tune saved it (our searcher and scheduler re-read their own files)."""
    print(f"resuming {plan.path}")
    errored = retry_errored(str(plan.file(SCHEDULER_FILE)))
    if errored:  # a trial whose retries a lost node (or any crash) used up: the resume gives it its retries again
        reopen_for_retry(str(plan.file(STUDY_FILE)), errored, plan.space.params)  # the study follows the retry
        print(f"retrying {len(errored)} errored trial(s) from their last checkpoint, with --max-failures "
              f"{plan.max_failures} retries again: {', '.join(errored)}")
    return _restore(plan, plan.path, trainable, resume_errored=True)


def confirm_tuner(plan: SearchPlan, trainable, runs: list[dict[str, Any]], folder: Path):
    """The confirmation phase: one trial per (candidate, seed) in ``runs``, in ``folder`` (restored if it exists)."""
    mirror = storage.mirror_of(plan.folder)  # a search on a URI: the confirmation's files as Tune left them there
    if mirror is not None:
        mirror.pull(folder.name, own=False)
    if tune_started(folder) and has_tune_state(folder):
        return _restore(plan, storage.join(plan.path, folder.name), trainable)
    if folder.exists():  # killed before Tune saved any state of it: nothing there can be resumed, so it starts again

        shutil.rmtree(folder)
        if mirror is not None:
            mirror.remove(folder.name)
    progress = SearchProgress(len(runs), plan.max_epochs, [], 1.0, None, [], label="confirmation run",
                              selection=plan.selection_metric)
    return tune.Tuner(trainable, param_space={RUN: tune.grid_search(runs)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent or None,
                                                  scheduler=ConfirmScheduler(),  # a full disk: one line, as above
                                                  trial_dirname_creator=trial_dirname),
                      run_config=_run_config(plan, folder.name, plan.path if not plan.local else str(folder.parent),
                                             [progress]))

