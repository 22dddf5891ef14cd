"""Does reduced precision keep accuracy? The digits default recipe, fp32 against bf16 autocast + channels_last.

A reduced-precision path may be on by default only if, on digits with the default recipe, its
held-out test accuracy is within 1 point of fp32 over 3 seeds. This script measures exactly that,
plus the wall time of each run.

Example::

    python bench/precision_accuracy.py               # seeds 0 1 2
    python bench/precision_accuracy.py --seeds 0 1 2 3 4

The last line is ``ratio=<mean bf16 test accuracy / mean fp32 test accuracy>``.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from method_accuracy import one_run  # the same run: the digits default recipe with some values set

from trainable.akd import default_device

VARIANTS = {"fp32": dict(precision="fp32", channels_last=False),
            "bf16 channels_last": dict(precision="bf16", channels_last=True)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    device = default_device()
    print(f"digits default recipe, device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {k: [] for k in VARIANTS}
    for seed in args.seeds:
        for name, speed in VARIANTS.items():  # alternate per seed
            acc, wall = one_run(seed, speed, device)
            results[name].append((acc, wall))
            print(f"  seed {seed}  {name:<20} test_acc {acc:.4f}  wall {wall:5.1f} s", flush=True)
    means = {k: statistics.mean(a for a, _ in v) for k, v in results.items()}
    walls = {k: statistics.median(w for _, w in v) for k, v in results.items()}
    diffs = [b[0] - f[0] for f, b in zip(results["fp32"], results["bf16 channels_last"])]
    print(f"mean test_acc: fp32 {means['fp32']:.4f}, bf16 channels_last {means['bf16 channels_last']:.4f} "
          f"(difference {100 * (means['bf16 channels_last'] - means['fp32']):+.2f} points; per seed "
          + ", ".join(f"{100 * d:+.2f}" for d in diffs) + ")")
    print(f"median wall: fp32 {walls['fp32']:.1f} s, bf16 channels_last {walls['bf16 channels_last']:.1f} s "
          f"(x{walls['fp32'] / walls['bf16 channels_last']:.2f} faster)")
    within = abs(means["bf16 channels_last"] - means["fp32"]) <= 0.01
    print(f"within 1 point of fp32 on the mean over {len(args.seeds)} seeds: {'yes' if within else 'NO'}")
    print(f"ratio={means['bf16 channels_last'] / means['fp32']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
