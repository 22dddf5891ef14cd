"""From a ``SearchPlan`` to running Ray Tune experiments: the teacher, Ray, the trainable, the tuners.

``prepare_teacher_for(plan)`` readies the teacher and the evaluation data once on the driver;
``start_ray(plan)`` starts or joins Ray and checks that a trial's resources exist;
``build_tuner`` / ``restore_tuner`` make the search's ``tune.Tuner`` and ``confirm_tuner`` the
confirmation phase's. Nothing here decides a setting: the plan has them all.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results.record import META_FILE, SCHEDULER_FILE, STUDY_FILE, STUDY_NAME, write_record
from search.plan import SearchPlan
from trainable.errors import UserError


@dataclass(frozen=True)
class Teacher:
    """The search's teacher, prepared once: the model, its architecture, the evaluation data and its accuracy."""

    model: Any  # torch.nn.Module in eval mode on the CPU
    arch: str
    data: Any  # trainable.tasks.EvalData
    accuracy: dict[str, float | None]  # teacher_val_acc, teacher_test_acc (None: the task has no labels)
    fingerprint: str


def prepare_teacher_for(plan: SearchPlan) -> Teacher:
    """Train (digits, cached) or load the teacher, load the evaluation data, and check a resume's teacher."""
    from trainable.akd import fingerprint
    from trainable.config import build_config
    from trainable.outputs import teacher_metrics
    from trainable.tasks import data_free, load_eval_data
    from trainable.teacher import prepare_teacher

    cfg = build_config(plan.trial_config)
    model, info = prepare_teacher(plan.task, cfg.teacher, plan.teacher_path, plan.seed, plan.data_root)
    check_students(plan, cfg.student)
    with data_free():
        data = load_eval_data(plan.task, plan.seed, cfg.val_fraction, plan.data_root, plan.download)
    teacher = Teacher(model, info["arch"], data, teacher_metrics(model, data), fingerprint(model))
    recorded = (plan.record or {}).get("teacher_fingerprint")
    if recorded not in (None, teacher.fingerprint):
        raise UserError(f"the teacher differs from the one search {plan.name!r} started with; pass the same --teacher")
    return teacher


def check_students(plan: SearchPlan, fixed: str) -> None:
    """Every foreign student the search can train (the config's, or each choice of a searched ``student``) builds
    and gives class scores at the task's shape: refused here, in one line, before Ray starts."""
    from trainable.sources import check_student
    from trainable.tasks import get_task

    task = get_task(plan.task)
    specs = {fixed} | {c for p in plan.space.params if p.name == "student" for c in p.choices}
    for spec in sorted(s for s in specs if isinstance(s, str)):
        check_student(spec, task.num_classes, task.channels, task.image_size)


def budget_check(plan: SearchPlan, teacher: Teacher):
    """The ``BudgetCheck`` of a new search's space and teacher; first refuse (exit 2) a space in which no setting
    fits the budget."""
    from search.budget import BudgetCheck, check_reachable
    from trainable.models import count_params

    check = BudgetCheck(dict(plan.trial_config), count_params(teacher.model), dict(plan.space.limits))
    check_reachable(plan.space.params, check, plan.seed)
    return check


def typical_trial_config(plan: SearchPlan):
    """The config of a typical trial of the search (``search.space.typical_config``): the one the door check builds
    and the speed measurement times."""
    from search.space import typical_config

    return typical_config(plan.trial_config, plan.space.params)


def check_trial_builds(plan: SearchPlan, teacher: Teacher, cfg) -> None:
    """One run of the typical trial's config ``cfg`` is built here, on the CPU, before Ray starts: a setting that
    cannot make a run (an AVKD prior folder without images, feature widths that need the projection switched off,
    ...) is refused in one line instead of erroring in every trial."""
    import copy

    import torch

    from trainable.akd import AKDRun
    from trainable.tasks import data_free

    with data_free():
        AKDRun(cfg, copy.deepcopy(teacher.model), teacher.data, torch.device("cpu"), data_root=plan.data_root)


def choose_trial_speed(plan: SearchPlan, teacher: Teacher, cfg):
    """The precision and layout every trial computes in (``trainable.speed``): measured once here, on the driver
    before Ray starts, with a trial's threads on a trial's device, for the typical trial's config ``cfg`` (cached
    per machine and models). A resumed search keeps the choice it started with."""
    from trainable.speed import Speed, choose_speed, torch_threads

    if plan.record is not None and plan.record.get("speed"):
        return Speed.from_record({**plan.record["speed"], "source": "as the search started"})
    with torch_threads(trial_threads(plan)):
        return choose_speed(cfg, teacher.model, teacher.data, trial_device(plan), data_root=plan.data_root)


def trial_threads(plan: SearchPlan) -> int:
    """torch's intra-op threads in a trial: its CPUs, so that trials side by side do not oversubscribe the cores."""
    return max(1, int(round(plan.cpus_per_trial)))


def trial_device(plan: SearchPlan):
    """Where a trial computes: CUDA where the trials get GPUs and CUDA is present, else the CPU."""
    import torch

    return torch.device("cuda") if gpus_per_trial(plan) > 0 and torch.cuda.is_available() else torch.device("cpu")


def gpus_per_trial(plan: SearchPlan) -> float:
    import torch

    if plan.gpus_per_trial is not None:
        return plan.gpus_per_trial
    return 1.0 if torch.cuda.is_available() else 0.0


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when a cluster address given as host:port does not answer."""
    import socket

    hostport = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError):
        raise UserError(f"--address {address}: nothing answers there within {timeout_s:.0f} s; start the cluster "
                        "(ray start --head) or pass its address") from None


def check_resources(plan: SearchPlan, cpus: float, gpus: float) -> None:
    """A trial's CPUs and GPUs exist among ``cpus`` and ``gpus`` (else trials would wait forever). Raises UserError."""
    if plan.cpus_per_trial > cpus:
        raise UserError(f"--cpus-per-trial {plan.cpus_per_trial:g} but the Ray cluster has {cpus:g} CPUs; lower it")
    if gpus_per_trial(plan) > gpus:
        raise UserError(f"--gpus-per-trial {gpus_per_trial(plan):g} but the Ray cluster has {gpus:g} GPUs; pass "
                        "--gpus-per-trial 0 to run on CPUs")


def check_local_resources(plan: SearchPlan) -> None:
    """Where the search starts its own Ray, the cluster is this machine: a trial that asks for more than it has is
    refused at once, before the teacher, the speed measurement or Ray start."""
    import ray
    import torch

    if plan.address or ray.is_initialized():
        return
    check_resources(plan, plan.num_cpus or os.cpu_count() or 1, torch.cuda.device_count())


def check_cluster(plan: SearchPlan) -> None:
    """The resources a trial asks for exist in the running Ray cluster."""
    import ray

    total = ray.cluster_resources()
    check_resources(plan, total.get("CPU", 0), total.get("GPU", 0))


def start_ray(plan: SearchPlan) -> None:
    """Start a local Ray (or join ``--address``) unless one is running in this process, then check resources."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a diverged run reports no val_acc
    if not plan.verbose:  # our progress lines instead of Tune's tables, banners and per-trial warnings
        import logging

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output engine: silent at verbose=0
        # Tune's own error lines too: a failed trial is reported once by the progress view, in one line, and its
        # traceback is in its error.txt (--verbose shows Tune's logging).
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if not ray.is_initialized():
        # A teacher or student given as package.module:callable is imported by every trial: the folder the
        # search runs from is importable there as it is here (a local Ray's workers inherit this environment).
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if os.getcwd() not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, paths)])
        if plan.address:
            check_address(plan.address)
        init = dict(address=plan.address) if plan.address else dict(num_cpus=plan.num_cpus, include_dashboard=False)
        try:  # workers' logs (a line per checkpoint) reach the terminal only with --verbose
            ray.init(log_to_driver=plan.verbose, configure_logging=False, **init)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or join Ray ({str(e).splitlines()[0][:200]}); check --address") from None
    check_cluster(plan)


def record_session(plan: SearchPlan, teacher: Teacher, speed, started: float) -> None:
    """Write the search record (a new search) or mark this session's start in it (a resume). ``speed`` is the
    trials' ``trainable.speed.Speed``."""
    if not plan.local:
        return
    if plan.resume:  # this session's time adds to the earlier sessions'
        record = {**plan.record, "session_started": started, "wall_before": float(plan.record.get("wall_s", 0.0)),
                  "folder": plan.path}  # where it is now (a copy or a move resumes in its own folder)
    else:
        from search.estimate import from_speed

        record = {**plan.record_fields(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "session_started": started,
                  "wall_before": 0.0, "wall_s": 0.0, "teacher_fingerprint": teacher.fingerprint,
                  "teacher_arch": teacher.arch, **teacher.accuracy, "speed": speed.record(),
                  "selected_on": plan.selection_metric, "folder": plan.path,
                  # the expected wall time from the speed measurement's timing, beside the real wall_s
                  "estimate_s": from_speed(plan, speed)}
    write_record(plan.file(META_FILE), record)


def make_trainable(plan: SearchPlan, teacher: Teacher, speed):
    """``akd_trial`` with the teacher, the data and the measured ``speed`` attached (shipped once through the
    object store) and resources."""
    from ray import tune

    from trainable.tune_trainable import akd_trial, teacher_payload

    return tune.with_resources(
        tune.with_parameters(akd_trial, teacher=teacher_payload(teacher.model, teacher.arch), data=teacher.data,
                             threads=trial_threads(plan), data_root=plan.data_root, speed=speed.record(),
                             search_dir=plan.path),
        resources={"cpu": plan.cpus_per_trial, "gpu": gpus_per_trial(plan)})


def _run_config(plan: SearchPlan, name: str, storage: str, callbacks: list):
    from ray import tune

    from search.algorithms import WallClock

    own = [WallClock(str(plan.file(META_FILE)))] if plan.local else []
    return tune.RunConfig(name=name, storage_path=storage, callbacks=[*callbacks, *own],
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                          failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                          verbose=1 if plan.verbose else 0)


def search_progress(plan: SearchPlan):
    """The compact live view of the search's trials (and the live report where the storage is local)."""
    from search.progress import SearchProgress
    from search.scheduler import milestones

    rungs = milestones(plan.grace_period, plan.reduction_factor, plan.max_epochs) if plan.early_stopping else []
    return SearchProgress(plan.num_samples, plan.max_epochs, rungs, plan.reduction_factor, plan.space.limits,
                          [p.name for p in plan.space.params],
                          state_file=str(plan.file(SCHEDULER_FILE)) if plan.local else None,
                          study_file=str(plan.file(STUDY_FILE)) if plan.local else None,
                          report_dir=plan.path if plan.local and plan.report and plan.report_every_s > 0 else None,
                          report_every_s=plan.report_every_s,
                          # each candidate's own seed mostly exists already: the extra seeds are the work left
                          confirm_runs=plan.confirm_top_k * max(1, plan.confirm_seeds - 1),
                          selection=plan.selection_metric)


def _restore(path: str, trainable):
    from ray import tune

    return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                              restart_errored=False)


def build_tuner(plan: SearchPlan, trainable, check=None):
    """A new search: our Optuna searcher (refusing settings over the budget with ``check``, a
    ``BudgetCheck``) and rung scheduler, ``num_samples`` trials."""
    from ray import tune

    from search.algorithms import SearchStateCallback, trial_dirname
    from search.scheduler import RungScheduler
    from search.searcher import OptunaSearcher

    scheduler = RungScheduler(plan.objectives, max_epochs=plan.max_epochs, grace_period=plan.grace_period,
                              reduction_factor=plan.reduction_factor, limits=plan.space.limits,
                              early_stopping=plan.early_stopping,
                              state_file=str(plan.file(SCHEDULER_FILE)) if plan.local else None)
    searcher = OptunaSearcher(plan.space.params, plan.objectives, plan.seed, plan.num_samples,
                              study_path=str(plan.file(STUDY_FILE)) if plan.local else None, study_name=STUDY_NAME,
                              scheduler=scheduler, limits=plan.space.limits, budget_check=check)
    if plan.local:
        plan.file(STUDY_FILE).parent.mkdir(parents=True, exist_ok=True)
    storage = plan.storage if not plan.local else str(Path(plan.path).parent)
    return tune.Tuner(
        trainable, param_space=plan.trial_config,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent or None,
                                    trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=_run_config(plan, plan.name, storage, [SearchStateCallback(scheduler), search_progress(plan)]))


def restore_tuner(plan: SearchPlan, trainable):
    """The interrupted search, as Tune saved it (our searcher and scheduler re-read their own files)."""
    print(f"resuming {plan.path}")
    return _restore(plan.path, trainable)


def confirm_tuner(plan: SearchPlan, trainable, runs: list[dict[str, Any]], folder: Path):
    """The confirmation phase: one trial per (candidate, seed) in ``runs``, in ``folder`` (restored if it exists)."""
    from ray import tune

    from search.algorithms import trial_dirname
    from search.progress import SearchProgress
    from trainable.tune_trainable import RUN

    if (folder / "tuner.pkl").exists() and any(folder.glob("experiment_state-*.json")):
        return _restore(str(folder), trainable)
    if folder.exists():  # killed before Tune saved any state of it: nothing there can be resumed, so it starts again
        import shutil

        shutil.rmtree(folder)
    progress = SearchProgress(len(runs), plan.max_epochs, [], 1.0, None, [], label="confirmation run",
                              selection=plan.selection_metric)
    return tune.Tuner(trainable, param_space={RUN: tune.grid_search(runs)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent or None,
                                                  trial_dirname_creator=trial_dirname),
                      run_config=_run_config(plan, folder.name, str(folder.parent), [progress]))
