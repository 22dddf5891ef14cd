"""Hyperparameter search over data-free adversarial distillation: Optuna proposes, ASHA stops, Ray runs.

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

from results.summary import ASHA_FILE, META_FILE, STUDY_FILE  # noqa: E402
from search.space import Space, load_space  # noqa: E402
from trainable.errors import UserError  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3
# --smoke: the whole pipeline at a size a test suite can afford.
SMOKE_CONFIG = dict(iters_per_epoch=2, batch_size=32, eval_batch_size=512)
SMOKE_BUDGET = dict(num_samples=3, max_epochs=3, grace_period=1, reduction_factor=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Search AKD hyperparameters with Optuna + ASHA on Ray Tune.")
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
    p.add_argument("--no-early-stopping", action="store_true", help="ASHA off: every trial runs max_epochs (for comparisons)")
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


def run_search(args: argparse.Namespace, argv: list[str]) -> int:
    start = time.time()
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError("--num-samples must be >= 1")
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        raise UserError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
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
    num_samples = args.num_samples or (meta or {}).get("num_samples") or (
        SMOKE_BUDGET["num_samples"] if args.smoke else space.num_samples)
    teacher_path = args.teacher or (meta or {}).get("teacher")
    data_root = args.data_root or (meta or {}).get("data_root")
    budget = dict(SMOKE_BUDGET if args.smoke else {}, num_samples=num_samples)
    max_epochs = budget.get("max_epochs", space.max_epochs)
    grace = max_epochs if args.no_early_stopping else min(budget.get("grace_period", space.grace_period), max_epochs)
    rf = budget.get("reduction_factor", space.reduction_factor)

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
    import ray
    import torch
    from ray import tune

    from search.algorithms import PersistentASHA, PruneAwareOptunaSearch, SearchStateCallback, trial_dirname
    from search.space import DefineByRun
    from trainable.tune_trainable import akd_trial, teacher_payload

    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if torch.cuda.is_available() else 0.0)
    if not ray.is_initialized():
        init = dict(address=args.address) if args.address else dict(num_cpus=args.num_cpus, include_dashboard=False)
        ray.init(log_to_driver=True, configure_logging=False, **init)

    if not args.resume:
        if _is_local(exp):
            Path(meta_file).parent.mkdir(parents=True, exist_ok=True)
            m = _meta(args, space, space.task, seed, num_samples)
            m.update(max_epochs=max_epochs, grace_period=grace, reduction_factor=rf)
            m.update(teacher_fingerprint=fingerprint(teacher), teacher_arch=tinfo["arch"], **teacher_acc)
            Path(meta_file).write_text(json.dumps(m, indent=2, default=list) + "\n")

    trainable = tune.with_resources(
        tune.with_parameters(akd_trial, teacher=teacher_payload(teacher, tinfo["arch"]), data=data,
                             threads=max(1, int(round(args.cpus_per_trial)))),
        resources={"cpu": args.cpus_per_trial, "gpu": gpus})
    if args.resume:
        print(f"resuming {exp}")
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        import optuna

        scheduler = PersistentASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=max_epochs,
                                   grace_period=grace, reduction_factor=rf,
                                   state_file=f"{exp}/{ASHA_FILE}" if _is_local(exp) else None)
        if space.multi_objective:
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, num_samples // 2)))
            metric, mode = [m for m, _ in space.objectives], [d for _, d in space.objectives]
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, num_samples // 3)))
            metric, mode = space.objectives[0]
        searcher = PruneAwareOptunaSearch(space=DefineByRun(space.params), metric=metric, mode=mode,
                                          sampler=sampler, scheduler=scheduler)
        tuner = tune.Tuner(
            trainable,
            param_space=base,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=args.max_concurrent or None,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=args.storage if "://" in args.storage else str(Path(exp).parent),
                callbacks=[SearchStateCallback(scheduler, searcher, f"{exp}/{STUDY_FILE}" if _is_local(exp) else None)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                verbose=1),
        )
    results = tuner.fit()

    from search.finish import finish_search

    wall_s = time.time() - start
    if _is_local(exp) and Path(meta_file).exists():  # wall time adds up over resumes
        m = json.loads(Path(meta_file).read_text())
        m["wall_s"] = wall_s = float(m.get("wall_s", 0.0)) + wall_s
        Path(meta_file).write_text(json.dumps(m, indent=2, default=list) + "\n")
    return finish_search(exp, results, num_samples, teacher, data, teacher_acc, space, wall_s,
                         resume_command(argv), report=not args.no_report)


if __name__ == "__main__":
    sys.exit(main())
