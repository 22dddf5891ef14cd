"""Do the methods and feature alignment pay? The digits default recipe under each method, over seeds.

Each variant is one ``trainable/run_akd.py`` run per seed (in this process, the same code path):
DFAD (the default), DFAD with feature alignment (``w_feature: 1``), DAFL's terms on DFAD's loop,
and AVKD with its embedded prior (letters). Printed per run: held-out test accuracy and wall time;
then each variant's mean and its difference from DFAD on the same seeds.

Example::

    python bench/method_accuracy.py                        # seeds 0 1 2, every variant
    python bench/method_accuracy.py --variants dfad features --seeds 0 1 2 3

The last line is ``ratio=<mean test accuracy with feature alignment / without>`` (when both ran).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from trainable.akd import default_device
from trainable.config import build_config
from trainable.measure import fit_and_test
from trainable.tasks import data_free, get_task, load_eval_data
from trainable.teacher import prepare_teacher

VARIANTS = {"dfad": {}, "features": {"w_feature": 1.0}, "dafl": {"method": "dafl"}, "avkd": {"method": "avkd"}}


def one_run(seed: int, values: dict, device) -> tuple[float, float]:
    cfg = build_config({"task": "digits", "seed": seed, **values})
    teacher, _ = prepare_teacher(get_task("digits"), cfg.teacher, None, seed, log=None)
    start = time.perf_counter()
    with data_free():
        data = load_eval_data(get_task("digits"), seed)
    acc = fit_and_test(cfg, teacher, data, device)
    return acc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    device = default_device()
    print(f"digits default recipe, device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {k: [] for k in args.variants}
    for seed in args.seeds:
        for name in args.variants:  # alternate per seed: machine noise hits all alike
            acc, wall = one_run(seed, VARIANTS[name], device)
            results[name].append((acc, wall))
            print(f"  seed {seed}  {name:<10} test_acc {acc:.4f}  wall {wall:5.1f} s", flush=True)
    for name, runs in results.items():
        mean = statistics.mean(a for a, _ in runs)
        line = f"{name:<10} mean test_acc {mean:.4f}  median wall {statistics.median(w for _, w in runs):5.1f} s"
        if name != "dfad" and "dfad" in results:
            diffs = [100 * (a - b[0]) for (a, _), b in zip(runs, results["dfad"])]
            line += (f"  vs dfad {100 * (mean - statistics.mean(a for a, _ in results['dfad'])):+.2f} points "
                     f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)})")
        print(line)
    if "dfad" in results and "features" in results:
        ratio = statistics.mean(a for a, _ in results["features"]) / statistics.mean(a for a, _ in results["dfad"])
        print(f"ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
