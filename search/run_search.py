"""Hyperparameter search over data-free adversarial distillation: Optuna proposes, rungs stop, Ray runs.

Example::

    python search/run_search.py --space spaces/capacity.yaml                # default task: digits
    python search/run_search.py --space spaces/capacity.yaml --resume       # finish an interrupted search
    python search/run_search.py --space spaces/capacity.yaml --task cifar100 --teacher T.pt \\
        --data-root data --gpus-per-trial 0.25
    python search/run_search.py --space spaces/lr.yaml --address auto       # join a running Ray cluster

Writes ``<storage>/<name>/`` (Ray's experiment files, ``summary/*.parquet``, ``best/``,
``report.html``). Exit codes: 0 done; 2 bad input; 3 interrupted (prints the resume command); 1 other.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not this folder's modules by bare name
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from search.finish import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE  # noqa: E402
from search.layout import CONFIRM_RESULTS, META_FILE, SCHEDULER_FILE, STUDY_FILE, STUDY_NAME  # noqa: E402
from search.space import Space, load_space  # noqa: E402
from trainable.errors import UserError  # noqa: E402

# --smoke: the whole pipeline at a size a test suite can afford.
SMOKE_CONFIG = dict(iters_per_epoch=2, batch_size=32, eval_batch_size=512)
SMOKE_BUDGET = dict(num_samples=3, max_epochs=3, grace_period=1, reduction_factor=2, confirm_top_k=1,
                    confirm_seeds=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Search AKD hyperparameters with Optuna and budget-aware early stopping on Ray Tune.")
    p.add_argument("--space", required=True, help="search space YAML (see spaces/)")
    p.add_argument("--name", help="experiment name (default: the space file's name)")
    p.add_argument("--storage", default="runs", help="where experiments live: a folder or a URI Ray accepts (default runs/)")
    p.add_argument("--resume", action="store_true", help="finish the named, interrupted search")
    p.add_argument("--task", help="task (default: the space's, else digits)")
    p.add_argument("--teacher", help="teacher checkpoint (required except for digits)")
    p.add_argument("--data-root", help="folder of the torchvision dataset")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (online)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the space's budget)")
    p.add_argument("--seed", type=int, help="seed of the sampler and of every run (default: the space's, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; torch threads follow (default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractional packs trials (default 1 if CUDA else 0)")
    p.add_argument("--max-concurrent", type=int, default=0, help="cap on trials running at once (0: as resources allow)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial from its checkpoint")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto, or ray://host:10001)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--no-early-stopping", action="store_true", help="no early stopping: every trial runs max_epochs")
    p.add_argument("--confirm-top-k", type=int, help="candidates re-run to max_epochs with extra seeds "
                   "(default: the space's budget.confirm_top_k, else 3; 0: off, the best is still finished)")
    p.add_argument("--confirm-seeds", type=int, help="seeds per candidate, its own included (default: the "
                   "space's budget.confirm_seeds, else 3)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets, for tests")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    return p


def experiment_path(storage: str, name: str) -> str:
    if "://" in storage:
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(storage).expanduser().resolve() / name)


def _is_local(path: str) -> bool:
    return "://" not in path


def resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a != "--resume"]
    return "python search/run_search.py " + " ".join(shlex.quote(a) for a in args) + " --resume"


def _read_meta(meta_file: str, name: str) -> dict:
    try:
        return json.loads(Path(meta_file).read_text())
    except (OSError, ValueError):
        raise UserError(f"cannot resume {name!r}: {meta_file} is missing or unreadable (was the search started "
                        "by this tool?); start a new search with --name") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run_search(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before Tune took over SIGINT (preparing the teacher, starting Ray)
        exp = Path(experiment_path(args.storage, args.name or Path(args.space).stem))
        if (exp / "tuner.pkl").exists():
            print(f"interrupted. Resume with:\n  {resume_command(argv)}", file=sys.stderr)
        else:
            print("interrupted before the search started; run the same command again", file=sys.stderr)
        return EXIT_INTERRUPTED


def _meta(args, space: Space, task: str, seed: int, num_samples: int) -> dict:
    return {"space_file": args.space, "space": space.raw, "task": task, "seed": seed, "num_samples": num_samples,
            "teacher": os.path.abspath(args.teacher) if args.teacher else None, "data_root": args.data_root,
            "smoke": args.smoke, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _pick(cli, meta: dict | None, key: str, smoke: bool, space_value):
    """One setting: CLI > the resumed search's record > --smoke > the space."""
    if cli is not None:
        return cli
    if meta is not None and meta.get(key) is not None:
        return meta[key]
    if smoke and key in SMOKE_BUDGET:
        return SMOKE_BUDGET[key]
    return space_value


def check_options(args: argparse.Namespace) -> None:
    """Every option that can be checked without Ray, before anything is written. Raises UserError."""
    import math

    def bad(flag: str, v, need: str):
        raise UserError(f"{flag} {v} is invalid: {need}")

    if args.num_samples is not None and args.num_samples < 1:
        bad("--num-samples", args.num_samples, "must be >= 1")
    if not math.isfinite(args.cpus_per_trial) or args.cpus_per_trial <= 0:
        bad("--cpus-per-trial", args.cpus_per_trial, "must be > 0")
    if args.gpus_per_trial is not None and (not math.isfinite(args.gpus_per_trial) or args.gpus_per_trial < 0
                                            or (args.gpus_per_trial > 1 and not args.gpus_per_trial.is_integer())):
        bad("--gpus-per-trial", args.gpus_per_trial, "must be >= 0; a fraction only below 1 (e.g. 0.25)")
    if args.max_concurrent < 0:
        bad("--max-concurrent", args.max_concurrent, "must be >= 0 (0: as resources allow)")
    if args.max_failures < 0:
        bad("--max-failures", args.max_failures, "must be >= 0")
    if args.num_cpus is not None and args.num_cpus < 1:
        bad("--num-cpus", args.num_cpus, "must be >= 1")
    if args.num_cpus is not None and args.address:
        raise UserError("--num-cpus sets up a local Ray; it cannot be combined with --address")
    for flag, v, low in (("--confirm-top-k", args.confirm_top_k, 0), ("--confirm-seeds", args.confirm_seeds, 1)):
        if v is not None and not low <= v <= 20:
            bad(flag, v, f"must be in [{low}, 20]")
    name = args.name or Path(args.space).stem
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UserError(f"--name {name!r} is invalid: a search name is one folder name inside --storage "
                        "(letters, digits, '-', '_'; no '/' or '..')")
    if "://" not in args.storage:
        storage = Path(args.storage).expanduser()
        if storage.exists() and not storage.is_dir():
            raise UserError(f"--storage {args.storage} is a file, not a folder; pass a folder for the searches")
        probe = storage if storage.exists() else next((p for p in storage.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"--storage {args.storage}: {probe} is not writable; pass a folder you can write to")
        if (storage / name).exists() and not (storage / name).is_dir():
            raise UserError(f"{storage / name} is a file; pass another --name")
        if args.resume and (storage / name).is_dir() and not os.access(storage / name, os.W_OK | os.X_OK):
            raise UserError(f"cannot resume: {storage / name} is read-only; make it writable or copy it")


def check_cluster(args: argparse.Namespace, gpus_per_trial: float) -> None:
    """The resources a trial asks for exist in the running Ray cluster (else trials would wait forever)."""
    import ray

    total = ray.cluster_resources()
    if args.cpus_per_trial > total.get("CPU", 0):
        raise UserError(f"--cpus-per-trial {args.cpus_per_trial:g} but the Ray cluster has "
                        f"{total.get('CPU', 0):g} CPUs; lower it")
    if gpus_per_trial > total.get("GPU", 0):
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {total.get('GPU', 0):g} "
                        "GPUs; pass --gpus-per-trial 0 to run on CPUs")


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


def run_search(args: argparse.Namespace, argv: list[str]) -> int:
    start = time.time()
    check_options(args)
    name = args.name or Path(args.space).stem
    exp = experiment_path(args.storage, name)
    meta_file = f"{exp}/{META_FILE}"
    exists = _is_local(exp) and Path(exp, "tuner.pkl").exists()
    if exists and not args.resume:
        raise UserError(f"a search named {name!r} already exists in {args.storage}; pass --resume to finish it, "
                        "or --name NEW to start another")
    if args.resume and _is_local(exp) and not exists:
        raise UserError(f"nothing to resume: no search named {name!r} in {args.storage}; drop --resume to start it")
    meta = _read_meta(meta_file, name) if args.resume and _is_local(exp) else None
    space = load_space(args.space, args.task or (meta or {}).get("task"))  # validated before Ray starts
    if meta is not None and meta["space"] != space.raw:
        raise UserError(f"{args.space} has changed since the search {name!r} started; restore the original "
                        "space to resume, or start a new search with --name")
    seed = args.seed if args.seed is not None else (meta or {}).get("seed", space.seed)
    if meta is not None and args.num_samples not in (None, meta["num_samples"]):
        raise UserError(f"search {name!r} was started with --num-samples {meta['num_samples']}; resume it with "
                        "the same number")
    num_samples = _pick(args.num_samples, meta, "num_samples", args.smoke, space.num_samples)
    teacher_path = args.teacher or (meta or {}).get("teacher")
    data_root = args.data_root or (meta or {}).get("data_root")
    max_epochs = _pick(None, meta, "max_epochs", args.smoke, space.max_epochs)
    early_stopping = not args.no_early_stopping if meta is None else meta.get("early_stopping", True)
    grace = min(_pick(None, meta, "grace_period", args.smoke, space.grace_period), max_epochs)
    rf = _pick(None, meta, "reduction_factor", args.smoke, space.reduction_factor)
    top_k = _pick(args.confirm_top_k, meta, "confirm_top_k", args.smoke, space.confirm_top_k)
    n_seeds = _pick(args.confirm_seeds, meta, "confirm_seeds", args.smoke, space.confirm_seeds)
    if _is_local(exp) and args.resume and Path(exp, CONFIRM_RESULTS).exists() and Path(exp, "best").is_dir():
        print(f"search {name!r} is finished; nothing to resume. Its results: {exp}")
        return EXIT_OK

    # The teacher and the evaluation data: prepared once, here, and shipped to every trial.
    from trainable.akd import fingerprint
    from trainable.config import build_config
    from trainable.outputs import teacher_metrics
    from trainable.tasks import data_free, load_eval_data
    from trainable.teacher import prepare_teacher

    base = {"task": space.task, "seed": seed, "epochs": max_epochs, **space.fixed,
            **(SMOKE_CONFIG if args.smoke else {})}
    base_cfg = build_config(base)
    teacher, tinfo = prepare_teacher(space.task, base_cfg.teacher, teacher_path, seed, data_root)
    with data_free():
        data = load_eval_data(space.task, seed, base_cfg.val_fraction, data_root, args.download)
    teacher_acc = teacher_metrics(teacher, data)
    if meta is not None and meta.get("teacher_fingerprint") not in (None, fingerprint(teacher)):
        raise UserError(f"the teacher differs from the one search {name!r} started with; pass the same --teacher")

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a diverged run reports no val_acc
    import ray
    import torch
    from ray import tune

    from search.algorithms import SearchStateCallback, WallClock, trial_dirname
    from search.scheduler import RungScheduler
    from search.searcher import OptunaSearcher
    from trainable.tune_trainable import akd_trial, teacher_payload

    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if torch.cuda.is_available() else 0.0)
    if not ray.is_initialized():
        if args.address:
            check_address(args.address)
        init = dict(address=args.address) if args.address else dict(num_cpus=args.num_cpus, include_dashboard=False)
        try:
            ray.init(log_to_driver=True, configure_logging=False, **init)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or join Ray ({str(e).splitlines()[0][:200]}); check --address") from None
    check_cluster(args, gpus)

    if args.resume and _is_local(exp):  # this session's time adds to the earlier sessions'
        from search.layout import write_json_atomic

        write_json_atomic(meta_file, {**meta, "session_started": start, "wall_before": float(meta.get("wall_s", 0.0))})
    if not args.resume and _is_local(exp):
        m = _meta(args, space, space.task, seed, num_samples)
        m.update(session_started=start, wall_before=0.0, wall_s=0.0)
        m.update(max_epochs=max_epochs, grace_period=grace, reduction_factor=rf, early_stopping=early_stopping,
                 confirm_top_k=top_k, confirm_seeds=n_seeds)
        m.update(teacher_fingerprint=fingerprint(teacher), teacher_arch=tinfo["arch"], **teacher_acc)
        from search.layout import write_json_atomic

        write_json_atomic(meta_file, m)

    trainable = tune.with_resources(
        tune.with_parameters(akd_trial, teacher=teacher_payload(teacher, tinfo["arch"]), data=data,
                             threads=max(1, int(round(args.cpus_per_trial)))),
        resources={"cpu": args.cpus_per_trial, "gpu": gpus})
    run_config = dict(callbacks=[WallClock(meta_file)] if _is_local(exp) else [],
                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                      failure_config=tune.FailureConfig(max_failures=args.max_failures), verbose=1)
    if args.resume:
        print(f"resuming {exp}")
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        local = _is_local(exp)
        scheduler = RungScheduler(space.objectives, max_t=max_epochs, grace_period=grace, reduction_factor=rf,
                                  param_budget=space.param_budget, early_stopping=early_stopping,
                                  state_file=f"{exp}/{SCHEDULER_FILE}" if local else None)
        searcher = OptunaSearcher(space.params, space.objectives, seed, num_samples,
                                  study_path=f"{exp}/{STUDY_FILE}" if local else None, study_name=STUDY_NAME,
                                  param_budget=space.param_budget, scheduler=scheduler)
        if local:
            Path(exp, STUDY_FILE).parent.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(
            trainable,
            param_space=base,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=args.max_concurrent or None,
                                        trial_dirname_creator=trial_dirname, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=args.storage if "://" in args.storage else str(Path(exp).parent),
                **{**run_config, "callbacks": [SearchStateCallback(scheduler), *run_config["callbacks"]]}),
        )
    tuner.fit()

    if not _is_local(exp):
        print(f"search finished; summaries are written for local storage only: run results/report.py on a copy of {exp}")
        return EXIT_OK
    from search.finish import finish_search

    return finish_search(Path(exp), num_samples, max_epochs, top_k, n_seeds, trainable, run_config, teacher, data,
                         teacher_acc, start, resume_command(argv), report=not args.no_report,
                         max_concurrent=args.max_concurrent)


if __name__ == "__main__":
    sys.exit(main())
