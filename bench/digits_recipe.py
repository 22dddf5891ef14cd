"""The digits recipe's cost against its accuracy: variants of the default recipe, A/B in one process.

The quick start's time is the digits recipe's iterations (see docs/speed.md: on a CPU without native
bf16 they are arithmetic-bound, mostly the teacher's convolutions), so a cheaper recipe is the lever
left; this bench says what a variant costs in held-out accuracy. For each variant (``--variant
KEY=V,KEY=V``; the first is the recipe as it ships) it measures:

- seconds per AKD iteration of the recipe's models (student at the default winner's size), one
  thread, fp32 + channels_last (what ``precision: auto`` picks on a CPU without native bf16),
  variants alternated, medians of ``--repeats``;
- the held-out test accuracy of a 20-epoch run at the default search's winning setting
  (``student_fraction`` 0.07656, ``lr_student`` 0.1407, ``lr_generator`` 0.0002001) for every seed of
  ``--seeds`` (the seed's validation/test split and the run's seed), variants alternated per seed.

Run it under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to approximate an AVX2-only CPU.

Example::

    python bench/digits_recipe.py                                   # shipped vs the earlier batch 128 + width 32, seeds 0-5
    python bench/digits_recipe.py --variant batch_size=64,generator_width=16 --seeds 0 1 2

The last line is ``ratio=<seconds per iteration, first variant / last>``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainable.akd import AKDRun
from trainable.config import build_config, parse_value
from trainable.measure import fit_and_test
from trainable.speed import Speed, machine_description
from trainable.tasks import EvalData, data_free, get_task, load_eval_data
from trainable.teacher import prepare_teacher

WINNER = dict(student_fraction=0.07656, lr_student=0.1407, lr_generator=0.0002001, epochs=20)  # the default search's
FP32_CL = Speed("fp32", True, "fixed")
EARLIER = "batch_size=128,generator_width=32"  # the digits recipe before it moved to batch 96, generator width 16


def variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = parse_value(key.strip(), value.strip())
    return out


def per_iteration(configs: dict[str, dict], teacher, repeats: int) -> dict[str, float]:
    """Median seconds per iteration of each variant, alternated."""
    empty = torch.zeros(1, 1, 8, 8)
    data = EvalData(empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(1, dtype=torch.long))
    runs = {}
    for name, values in configs.items():
        runs[name] = AKDRun(build_config({"task": "digits", **WINNER, **values}), teacher, data, torch.device("cpu"),
                            speed=FP32_CL)
        for _ in range(3):
            runs[name].iteration()  # warm-up
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(5):
                run.iteration()
            samples[name].append((time.perf_counter() - start) / 5)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[], metavar="KEY=V,KEY=V",
                   help=f"a variant of the recipe (repeatable); default: {EARLIER} (the recipe before batch 96)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=WINNER["epochs"], help="epochs of every run (default: the search's 20)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = {"shipped": {}, **{v: variant(v) for v in (args.variant or [EARLIER])}}
    task = get_task("digits")
    teacher, _ = prepare_teacher(task, None, None, 0, log=None)
    print(machine_description(torch.device("cpu")))
    iters = per_iteration(configs, teacher, args.repeats)
    accs: dict[str, list[float]] = {name: [] for name in configs}
    for seed in args.seeds:
        with data_free():
            data = load_eval_data(task, seed)
        for name, values in configs.items():
            cfg = build_config({"task": "digits", "seed": seed, **WINNER, "epochs": args.epochs, **values,
                                "precision": "fp32", "channels_last": True}, task=task)
            accs[name].append(fit_and_test(cfg, teacher, data, speed=FP32_CL))
            print(f"seed {seed} {name:<40} test_acc {accs[name][-1]:.4f}", flush=True)
    first = next(iter(configs))
    for name in configs:
        a = accs[name]
        line = (f"{name:<40} {1000 * iters[name]:6.1f} ms/iteration (x{iters[first] / iters[name]:.2f})  test_acc "
                f"{statistics.mean(a):.4f}" + (f" ± {statistics.stdev(a):.4f}" if len(a) > 1 else ""))
        if name != first:
            diffs = [x - y for x, y in zip(a, accs[first])]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            line += f"  against shipped {100 * statistics.mean(diffs):+.2f} points (standard error {100 * se:.2f})"
        print(line)
    print(f"ratio={iters[first] / iters[name]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
