"""Search quality on the default task: this project's search against Ray Tune's stock Optuna + ASHA.

For each seed, the same space (``spaces/capacity.yaml``: student size and learning rates, a 10%
parameter budget), the same number of trials, the same epochs and rungs are searched twice:

(a) stock: ``OptunaSearch`` (TPE) + ``ASHAScheduler`` on ``val_acc``, as a user would write them,
    with the same trainable; the best feasible trial is the highest final val_acc within the
    budget, whatever epoch it stopped at, evaluated once on the held-out test split;
(b) this project: ``python search/run_search.py --space spaces/capacity.yaml --seed S`` (budget-aware
    multi-objective rungs, the budget told to the sampler, the winner finished and confirmed over
    seeds); its ``best/metrics.json``.

Printed per seed and on average: the best feasible trial's held-out test_acc (for the project, the
mean over the winner's confirmation seeds, and the exported student's own, a single run selected
by val_acc like stock's), its params (share of the teacher), the epochs its student was trained,
the feasible trials that reached max_epochs, the total trial-epochs spent and the wall time. Like
for like, stock's pick is also evaluated as the project's winner is: its configuration over the
same seeds, every seed trained to max_epochs (one extra run per extra seed, outside the wall).

Example::

    python bench/search_quality.py                 # seeds 0 1 2, about 30 minutes on 2 cores
    python bench/search_quality.py --seeds 0
    python bench/search_quality.py --space my_space.yaml   # any space with two objectives and a budget

The last line is ``ratio=<mean test_acc, project (mean over its seeds) - stock, in points>``; with
``--project-only`` (the project's search alone, e.g. to check a smaller space's winner over seeds) it is
``ratio=<mean wall seconds of the project's search>``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from base import metrics as M
from base.layout import latest_checkpoint
from results.resultlog import read_result_lines
from search.confirm import SEED_STRIDE
from search.finish import evaluate_run
from search.space import load_space, typical_config
from trainable.config import build_config
from trainable.measure import choose_speed, fit_and_test
from trainable.tasks import data_free, load_eval_data
from trainable.teacher import prepare_teacher
from trainable.tune_trainable import akd_trial, teacher_payload

ROOT = Path(__file__).resolve().parents[1]


def trial_epochs(exp: Path) -> dict[str, int]:
    """Epochs reported by each trial folder of an experiment."""
    return {d.name.removeprefix("trial_"): max((int(r.get("epoch", 0)) for r in read_result_lines(d / "result.json")),
                                               default=0)
            for d in exp.glob("trial_*")}


def stock(seed: int, storage: Path, num_cpus: int, space_file: Path) -> dict:
    """(a) Ray Tune's stock OptunaSearch + ASHAScheduler on val_acc, on the same trainable and space."""
    space = load_space(space_file)
    start = time.time()
    base = {"task": space.task, "seed": seed, "epochs": space.max_epochs, **space.fixed}
    cfg = build_config(base, task=space.task_spec)
    teacher, info = prepare_teacher(space.task_spec, cfg.teacher, None, seed)
    with data_free():
        data = load_eval_data(space.task_spec, seed, cfg.val_fraction)
    # The same precision and layout as the project's trials (measured with one thread, cached), so that the two
    # sides differ in how they search, not in how fast a trial runs.
    torch.set_num_threads(1)
    speed = choose_speed(typical_config(base, space.params, space.task_spec), teacher, data, torch.device("cpu"))
    param_space = dict(base)
    for p in space.params:  # the same distributions, written as a Tune user would
        param_space[p.name] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(akd_trial, teacher=teacher_payload(teacher, info["arch"]),
                                                     task=space.task_spec, data=data, threads=1,
                                                     speed=speed.record()), {"cpu": 1}),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=space.num_samples,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed)),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=space.max_epochs, grace_period=space.grace_period,
                                        reduction_factor=space.reduction_factor)),
            run_config=tune.RunConfig(name="stock", storage_path=str(storage), verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    return {**stock_pick(grid, space, teacher, data), "wall": time.time() - start}


def stock_pick(grid, space, teacher, data) -> dict:
    """Stock's result grid judged as the project's: its best feasible trial by val_acc, evaluated on the test split,
    and its configuration over the project's seeds."""
    rows = [(r.metrics or {}, Path(r.path)) for r in grid]
    feasible = [(m, p) for m, p in rows if m.get(M.PARAM_RATIO) is not None and m[M.PARAM_RATIO] <= space.param_budget
                and m.get(M.VAL_ACC) is not None]
    best_m, best_p = max(feasible, key=lambda mp: mp[0][M.VAL_ACC])
    final = evaluate_run(latest_checkpoint(best_p), space.task_spec, teacher, data)
    epochs = {p.name: int(m.get(M.EPOCH, 0)) for m, p in rows}
    config = next(dict(r.config) for r in grid if Path(r.path) == best_p)
    return {"test_acc": final[M.TEST_ACC], "param_ratio": final[M.PARAM_RATIO], "epochs": final["epochs"],
            "feasible_full": sum(1 for m, p in feasible if int(m.get(M.EPOCH, 0)) >= space.max_epochs),
            "trial_epochs": sum(epochs.values()), "seed_runs": seed_runs(config, final, space, teacher, data)}


def seed_runs(config: dict, final: dict, space, teacher, data) -> list[float]:
    """Stock's pick evaluated like the project's winner: held-out test_acc over the same seeds (its own and
    ``seed + 1000``, ...; ``confirm_seeds`` of them), every seed trained to max_epochs. Its own seed is the
    trial itself when it ran max_epochs, else a fresh full run."""
    base = int(config.get("seed", 0))
    out = []
    for i in range(max(1, space.confirm_seeds)):
        if i == 0 and final["epochs"] >= space.max_epochs:
            out.append(final[M.TEST_ACC])
            continue
        cfg = build_config({**config, "seed": base + SEED_STRIDE * i, "epochs": space.max_epochs})
        out.append(fit_and_test(cfg, teacher, data))
    return out


def project(seed: int, storage: Path, num_cpus: int, space_file: Path) -> dict:
    """(b) This project's search command."""
    start = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space",
                        str(space_file), "--seed", str(seed), "--storage", str(storage),
                        "--name", "project", "--no-report", "--num-cpus", str(num_cpus)],
                       cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if r.returncode != 0:
        sys.exit(f"the project's search failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    exp = storage / "project"
    m = json.loads((exp / "best" / "metrics.json").read_text())
    trials = pd.read_parquet(exp / "summary" / "trials.parquet")
    max_epochs = int(json.loads((exp / "akdtune" / "search.json").read_text())["max_epochs"])
    feasible_full = int((trials["within_budget"] & (trials["epochs_run"] >= max_epochs)).sum())
    spent = sum(trial_epochs(exp).values()) + sum(trial_epochs(exp / "confirm").values())
    return {"test_acc": m["test_acc"], "test_acc_std": m["test_acc_std"], "student_test_acc": m["student_test_acc"],
            "param_ratio": m["param_ratio"],
            "epochs": m["epochs"], "seeds": m["seeds"], "feasible_full": feasible_full, "trial_epochs": spent,
            "wall": wall}


def spread(diffs: list[float]) -> str:
    """The per-seed differences, in points, and their mean's standard error: how far the mean can be trusted."""
    per = ", ".join(f"{100 * d:+.2f}" for d in diffs)
    if len(diffs) < 2:
        return f" (per seed {per})"
    return f" (per seed {per}; standard error of the mean {100 * statistics.stdev(diffs) / len(diffs) ** 0.5:.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--storage", help="keep the experiments here (default: a temporary folder)")
    p.add_argument("--space", default=str(ROOT / "spaces" / "capacity.yaml"),
                   help="a space with two objectives and a param_budget (default spaces/capacity.yaml)")
    p.add_argument("--project-only", action="store_true",
                   help="run only the project's search per seed (a space's winner quality and wall over seeds, "
                        "without the comparison with stock)")
    args = p.parse_args(argv)

    max_epochs = load_space(args.space).max_epochs
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    out = {"project": []} if args.project_only else {"stock": [], "project": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.storage or tmp)
        for seed in args.seeds:
            for name, fn in ((n, {"stock": stock, "project": project}[n]) for n in out):
                storage = root / f"seed{seed}" / name
                storage.mkdir(parents=True, exist_ok=True)
                res = fn(seed, storage, args.num_cpus, Path(args.space).resolve())
                out[name].append(res)
                std = (f" ± {res['test_acc_std']:.4f} (mean over seeds {res['seeds']}; the exported student's own "
                       f"{res['student_test_acc']:.4f})" if "test_acc_std" in res else
                       f" (its configuration over {len(res['seed_runs'])} seeds like the project's winner: "
                       f"{statistics.mean(res['seed_runs']):.4f})")
                print(f"seed {seed} {name:<8} best feasible test_acc {res['test_acc']:.4f}{std}  params "
                      f"{res['param_ratio']:.1%}  its epochs {res['epochs']:>2}  feasible trials at max_epochs "
                      f"{res['feasible_full']:>2}  trial-epochs {res['trial_epochs']:>4}  wall {res['wall']:6.1f} s",
                      flush=True)
    return summary(out, max_epochs, args.project_only)


def summary(out: dict[str, list[dict]], max_epochs: int, project_only: bool) -> int:
    """The means over the seeds, the project against stock, and the ratio line."""
    mean = {k: {f: sum(r[f] for r in v) / len(v) for f in ("test_acc", "epochs", "feasible_full", "trial_epochs", "wall")}
            for k, v in out.items()}
    for k, m in mean.items():
        print(f"mean     {k:<8} best feasible test_acc {m['test_acc']:.4f}  its epochs {m['epochs']:.1f}  feasible "
              f"trials at max_epochs {m['feasible_full']:.1f}  trial-epochs {m['trial_epochs']:.0f}  wall {m['wall']:.0f} s")
    own = statistics.mean(r["student_test_acc"] for r in out["project"])
    full = all(r["epochs"] >= max_epochs for r in out["project"])
    if project_only:
        accs = [r["test_acc"] for r in out["project"]]
        print(f"mean     project  exported student's own test_acc {own:.4f} (one run)")
        print(f"project winner over {len(accs)} seed(s): lowest {min(accs):.4f}, highest {max(accs):.4f}"
              + (f", standard deviation {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""))
        print(f"project winner fully trained on every seed: {full}")
        print(f"ratio={mean['project']['wall']:.1f}")
        return 0
    like = statistics.mean(statistics.mean(r["seed_runs"]) for r in out["stock"])
    print(f"mean     project  exported student's own test_acc {own:.4f} (one run, selected like stock's)")
    print(f"mean     stock    its pick over the project's seeds, every seed to max_epochs: {like:.4f}")
    diff = 100 * (mean["project"]["test_acc"] - mean["stock"]["test_acc"])
    print(f"project - stock: {diff:+.2f} points of held-out test_acc (project: mean over its seeds; stock: its one run)"
          + spread([p["test_acc"] - s["test_acc"] for p, s in zip(out["project"], out["stock"])]))
    print(f"  like for like: {100 * (own - mean['stock']['test_acc']):+.2f} points one run against one run; "
          f"{100 * (mean['project']['test_acc'] - like):+.2f} points mean over the same seeds against mean"
          + spread([p["test_acc"] - statistics.mean(s["seed_runs"]) for p, s in zip(out["project"], out["stock"])]))
    print(f"project winner fully trained on every seed: {full}")
    print("repeatable: the project's rows are the same on a second run of this command (its searches decide in the "
          "trials' order; tests/test_search.py checks it); stock's decide as results arrive, so with trials in "
          "parallel its rows, and the difference, may change from run to run")
    print(f"ratio={diff:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
