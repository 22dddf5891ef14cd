"""How high a capacity search can score: the best held-out test_acc a student within the budget reaches.

A search's winner can only be as good as the best setting within the space's budget. This bench
measures that ceiling directly, the way ``bench/search_quality.py`` scores a search's winner: for
each seed S (S's teacher and validation/test split, as ``run_search.py --seed S`` has them), every
setting of a small grid is trained over the confirmation's seeds (S, S + 1000, ...; the space's
``confirm_seeds``) to the space's ``max_epochs``, one thread per run, ``--num-cpus`` runs at a time.

- The student's size is the largest the budget admits: the one numeric parameter that sets the size
  (found by probing the budget check, ``search/budget.py``) takes the value giving the largest
  student within it. In the searches measured here larger students scored higher on average, though
  a smaller one sometimes won a single search.
- The other parameters take the values given with ``--grid NAME=V1,V2,...``; one not named is held
  at the middle of its range (on the log scale where the space says so). The default grid for
  ``spaces/capacity.yaml`` brackets the searches' winners (lr_student 0.1-0.25, lr_generator
  0.0002-0.0011 in ``bench/search_quality.py``).

Printed: each setting's test_acc per seed (the mean over the confirmation seeds) and over all seeds,
then the best setting's mean, the ceiling. The best is chosen on the test split itself, so the
ceiling is if anything an overestimate of what a search that selects on validation can expect.
How much is noise: the spread of the settings' means is printed beside the spread that the runs'
own noise would give them if every setting were equally good (from the runs of one setting and seed,
which differ only in the student's seed), with the mean over all settings and how far the best of
that many equally good settings would lie above it by chance. When the two spreads are alike, the
grid's differences, and so most of the ceiling's lead, are noise that no search can select on.
With ``--against X`` (e.g. the stock integration's mean from ``bench/search_quality.py``) it also
prints the most a search can expect to gain over X.

Example::

    python bench/capacity_ceiling.py                        # seeds 0 1 2, 6 settings x 2 runs each: ~15 min on 2 cores
    python bench/capacity_ceiling.py --against 0.9657
    python bench/capacity_ceiling.py --grid lr_student=0.15,0.25 --grid lr_generator=0.0005

The last line is ``ratio=<ceiling - X, in points>`` with ``--against X``, else ``ratio=<ceiling>``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from base import metrics as M  # noqa: E402
from base.errors import UserError  # noqa: E402
from search.budget import BudgetCheck  # noqa: E402
from search.confirm import SEED_STRIDE  # noqa: E402
from search.space import load_space  # noqa: E402
from trainable.config import build_config  # noqa: E402
from trainable.measure import fit_and_test  # noqa: E402
from trainable.models import count_params  # noqa: E402
from trainable.tasks import data_free, load_eval_data  # noqa: E402
from trainable.teacher import prepare_teacher  # noqa: E402

DEFAULT_GRID = {"lr_student": (0.12, 0.2, 0.3), "lr_generator": (0.0003, 0.0008)}  # for spaces/capacity.yaml
PROBES = 64  # values of the size parameter tried (evenly, on its scale) to find the largest student within the budget


def _values(p, n: int) -> list[float]:
    """``n`` values spread evenly over a numeric parameter's range (log scale where it is log)."""
    lo, hi = float(p.low), float(p.high)
    f = (lambda t: lo * (hi / lo) ** t) if p.log else (lambda t: lo + (hi - lo) * t)
    vals = [f(i / (n - 1)) for i in range(n)] if n > 1 else [f(0.5)]
    return [int(round(v)) for v in vals] if p.type == "int" else vals


def middle(p) -> Any:
    """A parameter's value when the grid does not name it: a fixed one's value, a categorical one's first
    choice, else the middle of its range."""
    if p.type == "fixed":
        return p.value
    return p.choices[0] if p.type == "categorical" else _values(p, 1)[0]


def show(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def largest_within(space, check) -> tuple[dict[str, Any], float]:
    """The size parameter's value that gives the largest student within the budget, and that student's
    param_ratio. The size parameter is the one numeric parameter whose value changes the student's costs."""
    numeric = [p for p in space.params if p.type in ("float", "int")]
    held = {p.name: middle(p) for p in space.params}
    sizing = [p for p in numeric
              if check.costs({**held, p.name: p.low}) != check.costs({**held, p.name: p.high})]
    if len(sizing) != 1:
        raise UserError(f"this bench needs a space whose student size is set by one numeric parameter; "
                         f"{space.path} has {len(sizing)} ({', '.join(p.name for p in sizing) or 'none'})")
    p = sizing[0]
    best: tuple[float, list[float]] = (-math.inf, [])
    for v in _values(p, PROBES):
        costs = check.costs({**held, p.name: v})
        if costs is None or check.reason(costs) is not None:
            continue
        size = costs[M.PARAM_RATIO]
        if size > best[0] + 1e-12:
            best = (size, [v])
        elif abs(size - best[0]) <= 1e-12:
            best[1].append(v)
    if not best[1]:
        raise UserError(f"no value of {p.name} in {space.path} gives a student within its budget")
    vs = best[1]
    value = vs[len(vs) // 2]  # the middle of the values that build this student
    return {p.name: value}, best[0]


def check_grid(space, grid: dict[str, tuple], base: dict[str, Any]) -> None:
    """Refuse, in one line, a grid naming no parameter of the space, or a value of the wrong kind or one the
    run's config refuses (e.g. a negative learning rate)."""
    names = {p.name for p in space.params}
    unknown = sorted(set(grid) - names)
    if unknown:
        raise UserError(f"--grid names {', '.join(unknown)}, not a parameter of {space.path} "
                        f"(its parameters: {', '.join(sorted(names))})")
    held = {p.name: middle(p) for p in space.params}
    for p in space.params:
        for v in grid.get(p.name, ()):
            if p.type in ("float", "int") and not (isinstance(v, float) and math.isfinite(v)):
                raise UserError(f"--grid {p.name}: {v!r} is not a finite number")
            if p.type == "categorical" and v not in p.choices and str(v) not in map(str, p.choices):
                raise UserError(f"--grid {p.name}: {v!r} is not one of its choices ({', '.join(map(str, p.choices))})")
            build_config({**base, **held, p.name: v})


def grid_settings(space, sizing: dict[str, Any], grid: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, with the size parameter at ``sizing`` and the parameters the grid
    does not name at ``middle``."""
    axes = {p.name: grid.get(p.name, (middle(p),)) for p in space.params if p.name not in sizing}
    keys = list(axes)
    return [{**sizing, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


def noise(per_setting: list[dict[int, list[float]]]) -> dict[str, float]:
    """How far the settings' mean test_acc differ, against what the runs' noise alone would give.

    Args:
        per_setting: for each setting, seed -> the test_acc of its runs at that seed (the same seeds and
            number of runs for every setting).

    Returns ``mean`` (over all settings), ``spread`` (std of the settings' means), ``noise_spread`` (the std
    a setting's mean would have from run noise alone: the pooled std of runs within one setting and seed,
    over the square root of a setting's runs; seed effects are shared by all settings and cancel) and
    ``luck`` (how far the best of that many settings that were all equally good would lie above their
    mean by chance, expected: ``noise_spread`` times the expected maximum of as many standard normals);
    NaN where there are too few runs to tell.
    """
    means = [statistics.mean(statistics.mean(v) for v in by_seed.values()) for by_seed in per_setting]
    cells = [v for s in per_setting for v in s.values()]
    dof = sum(len(v) - 1 for v in cells)
    within = math.sqrt(sum((x - statistics.mean(v)) ** 2 for v in cells for x in v) / dof) if dof else math.nan
    runs = sum(len(v) for v in cells) / len(per_setting) if per_setting else 0  # a setting's runs
    noise_spread = within / math.sqrt(runs) if runs else math.nan
    k = len(means)
    # Blom's approximation of the expected maximum of k standard normals.
    e_max = statistics.NormalDist().inv_cdf((k - 0.375) / (k + 0.25)) if k > 1 else 0.0
    return {"mean": statistics.mean(means) if means else math.nan,
            "spread": statistics.stdev(means) if k > 1 else math.nan,
            "noise_spread": noise_spread, "luck": noise_spread * e_max}


_CACHE: dict[int, tuple] = {}


def train_one(job: tuple[dict[str, Any], int, int, str | None, str | None]) -> float:
    """One run to max_epochs in a worker process, one thread: its held-out test_acc."""
    config, search_seed, run_seed, teacher_path, data_root = job
    torch.set_num_threads(1)
    cfg = build_config({**config, "seed": run_seed})
    if search_seed not in _CACHE:
        teacher, _ = prepare_teacher(cfg.task_spec, cfg.teacher, teacher_path, search_seed, data_root, log=None)
        with data_free():
            _CACHE[search_seed] = (teacher, load_eval_data(cfg.task_spec, search_seed, cfg.val_fraction, data_root))
    teacher, data = _CACHE[search_seed]
    return fit_and_test(cfg, teacher, data, data_root=data_root)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def parse_grid(items: list[str]) -> dict[str, tuple]:
    out = {}
    for item in items:
        name, sep, vals = item.partition("=")
        values = [v.strip() for v in vals.split(",")]
        if not sep or not name.strip() or not all(values):
            raise UserError(f"--grid {item!r} is not NAME=V1,V2,..., e.g. lr_student=0.1,0.2")
        out[name.strip()] = tuple(_number(v) for v in values)
    return out


def run_settings(settings: list[dict], jobs: list[tuple], run_seeds: dict[int, list[int]], searched: list[str],
                 num_cpus: int) -> tuple[list[float], list[dict[int, list[float]]]]:
    """Train every job in a pool; per setting, in order: its mean held-out test_acc over the seeds (a line printed as
    its runs are in), and each seed's runs' test_acc."""
    means: list[float] = []
    per_setting: list[dict[int, list[float]]] = []  # each setting's seed -> its runs' test_acc
    with ProcessPoolExecutor(max_workers=max(1, num_cpus), mp_context=get_context("spawn")) as pool:
        results = pool.map(train_one, jobs)  # in the jobs' order: each setting's line prints once its runs are in
        for cfg in settings:
            per_seed = {s: [next(results) for _ in runs] for s, runs in run_seeds.items()}
            seed_means = [statistics.mean(v) for v in per_seed.values()]
            means.append(statistics.mean(seed_means))
            per_setting.append(per_seed)
            runs = [a for v in per_seed.values() for a in v]
            sd = statistics.stdev(runs) if len(runs) > 1 else 0.0
            print(f"{', '.join(f'{k}={show(cfg[k])}' for k in searched):<40} test_acc per seed "
                  f"{' / '.join(f'{m:.4f}' for m in seed_means)}  mean {means[-1]:.4f}  (runs' std {sd:.4f})",
                  flush=True)
    return means, per_setting


def main(argv: list[str] | None = None) -> int:
    try:
        return measure(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(ROOT / "spaces" / "capacity.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="values of a searched parameter (repeatable); default for capacity.yaml: "
                        + " ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_GRID.items()))
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the space's max_epochs)")
    p.add_argument("--confirm-seeds", type=int, help="runs per seed (default: the space's confirm_seeds)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--teacher", help="teacher checkpoint (state_dict); required except for digits")
    p.add_argument("--data-root", help="folder of the torchvision dataset (tasks other than digits)")
    p.add_argument("--against", type=float, help="a search's mean best feasible test_acc to compare with")
    return p


def measure(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)

    space = load_space(args.space)
    grid = parse_grid(args.grid) or (DEFAULT_GRID if Path(args.space).resolve() == ROOT / "spaces" / "capacity.yaml"
                                     else {})
    if not space.limits:
        raise UserError(f"{args.space} has no budget (param_budget or budget.flops); the ceiling is "
                         "the best student within a budget")
    epochs = args.epochs or space.max_epochs
    n_seeds = max(1, args.confirm_seeds or space.confirm_seeds)
    base = {"task": space.task or "digits", "epochs": epochs, **space.fixed}
    check_grid(space, grid, base)
    arch = build_config(base, task=space.task_spec).teacher
    teacher, _ = prepare_teacher(space.task_spec, arch, args.teacher, args.seeds[0], args.data_root, log=None)
    check = BudgetCheck(base, count_params(teacher), dict(space.limits), space.task_spec)
    sizing, size = largest_within(space, check)
    settings = [{**base, **s} for s in grid_settings(space, sizing, grid)]
    run_seeds = {s: [s + SEED_STRIDE * i for i in range(n_seeds)] for s in args.seeds}
    print(f"{space.path}: the largest student within {', '.join(f'{k} <= {v:g}' for k, v in space.limits.items())} "
          f"is {size:.1%} of the teacher's params ({', '.join(f'{k}={show(v)}' for k, v in sizing.items())}); "
          f"{len(settings)} settings x seeds {args.seeds} x {n_seeds} runs of {epochs} epochs", flush=True)

    jobs = [(cfg, s, r, args.teacher, args.data_root) for cfg in settings for s in args.seeds for r in run_seeds[s]]
    searched = [p.name for p in space.params if p.name not in sizing]
    start = time.time()
    means, per_setting = run_settings(settings, jobs, run_seeds, searched, args.num_cpus)
    wall = time.time() - start
    best = max(range(len(means)), key=lambda i: means[i])
    ceiling = means[best]
    print(f"ceiling: {ceiling:.4f} mean held-out test_acc, the best of {len(settings)} settings "
          f"({', '.join(f'{k}={show(settings[best][k])}' for k in searched)}; chosen on the test split itself); "
          f"{len(jobs)} runs in {wall:.0f} s")
    n = noise(per_setting)
    if len(settings) > 1 and not math.isnan(n["noise_spread"]):
        print(f"noise: the settings' means spread by {n['spread']:.4f} (std); the runs' noise alone would spread "
              f"equally good settings by {n['noise_spread']:.4f}. Mean of all settings {n['mean']:.4f}; the best "
              f"of {len(settings)} equally good settings would lie {100 * n['luck']:.2f} points above it by chance")
    if args.against is not None:
        gain = 100 * (ceiling - args.against)
        print(f"the most a search can expect over {args.against:.4f}: {gain:+.2f} points")
        print(f"ratio={gain:.2f}")
    else:
        print(f"ratio={ceiling:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
