"""Threads per trial: how many trials side by side, with how many torch threads each, use the cores best.

A search runs ``--max-concurrent`` trials at once, each with ``--cpus-per-trial`` torch intra-op
threads. This measures the aggregate throughput of the digits default run (its models, batch and
step ratio, at the precision ``auto`` chooses on this machine) for each (trials at once, threads per
trial) layout, as plain processes (what a Tune trial is, without Ray's start-up): every process runs
the same number of full AKD iterations, and the figure is all processes' images over the wall time
from the first start to the last end. Layouts alternate inside each repeat; medians are printed with
the ratio against one trial with one thread. ``trials x threads > cores`` oversubscribes the cores.

Example::

    python bench/trial_threads.py                        # layouts 1x1, 1x2, 2x1, 2x2 on this machine
    python bench/trial_threads.py --layouts 2x1,1x2 --iters 40 --repeats 5

The last line is ``ratio=<best layout with all cores busy / 1x1>``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch


def _worker(threads: int, iters: int, speed: dict, start, out) -> None:
    torch.set_num_threads(threads)
    from trainable.akd import AKDRun  # noqa: PLC0415 - each worker loads the project after setting its thread count
    from trainable.config import build_config  # noqa: PLC0415 - each worker loads the project after setting its thread count
    from trainable.speed import Speed  # noqa: PLC0415 - each worker loads the project after setting its thread count
    from trainable.tasks import EvalData, get_task  # noqa: PLC0415 - each worker loads the project after setting its thread count
    from trainable.teacher import prepare_teacher  # noqa: PLC0415 - each worker loads the project after setting its thread count

    cfg = build_config({"task": "digits"})
    teacher, _ = prepare_teacher(get_task("digits"), log=None)
    empty = torch.zeros(1, 1, 8, 8)
    data = EvalData(empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(1, dtype=torch.long))
    run = AKDRun(cfg, teacher, data, torch.device("cpu"), speed=Speed.from_record(speed))
    run.iteration()  # warm-up
    start.wait()  # every process of the layout starts together
    t0 = time.perf_counter()
    for _ in range(iters):
        run.iteration()
    out.put((t0, time.perf_counter(), iters * cfg.batch_size * (cfg.n_student + cfg.n_generator),
             torch.get_num_threads()))


def measure(trials: int, threads: int, iters: int, speed: dict) -> tuple[float, list[int]]:
    """Aggregate images per second of ``trials`` processes with ``threads`` threads each, and their threads."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(trials), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, iters, speed, start, out)) for _ in range(trials)]
    for p in procs:
        p.start()
    rows = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[1] for r in rows) - min(r[0] for r in rows)
    return sum(r[2] for r in rows) / wall, [r[3] for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1x1,1x2,2x1,2x2", help="comma list of TRIALSxTHREADS")
    p.add_argument("--iters", type=int, default=30, help="AKD iterations per process per measurement")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    layouts = []
    for item in args.layouts.split(","):
        try:
            a, b = (int(v) for v in item.lower().split("x"))
        except ValueError:
            print(f"error: --layouts {item!r} is not TRIALSxTHREADS (e.g. 2x1)", file=sys.stderr)
            return 2
        if a < 1 or b < 1:
            print(f"error: --layouts {item!r}: trials and threads must be 1 or more", file=sys.stderr)
            return 2
        layouts.append((a, b))
    if args.iters < 1 or args.repeats < 1:
        print("error: --iters and --repeats must be 1 or more", file=sys.stderr)
        return 2

    from trainable.config import build_config  # noqa: PLC0415 - the project is loaded only in the workers, after their thread count is set
    from trainable.measure import choose_speed  # noqa: PLC0415 - the project is loaded only in the workers, after their thread count is set
    from trainable.speed import machine_description  # noqa: PLC0415 - the project is loaded only in the workers, after their thread count is set
    from trainable.tasks import get_task, load_eval_data  # noqa: PLC0415 - the project is loaded only in the workers, after their thread count is set
    from trainable.teacher import prepare_teacher  # noqa: PLC0415 - the project is loaded only in the workers, after their thread count is set

    torch.set_num_threads(1)  # the choice a one-thread trial would get
    teacher, _ = prepare_teacher(get_task("digits"), log=None)
    speed = choose_speed(build_config({"task": "digits"}), teacher, load_eval_data(get_task("digits")), torch.device("cpu"))
    cores = os.cpu_count() or 1
    print(f"{machine_description(torch.device('cpu'))}; {cores} cores; digits default run at {speed.name}; "
          f"{args.iters} iterations per process, {args.repeats} repeats")
    samples: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    seen: dict[tuple[int, int], list[int]] = {}
    for _ in range(args.repeats):
        for lay in layouts:
            rate, threads = measure(*lay, args.iters, speed.record())
            samples[lay].append(rate)
            seen[lay] = threads
    base = statistics.median(samples[(1, 1)]) if (1, 1) in samples else None
    print(f"  {'trials x threads':<18} {'img/s':>9}  {'range':>13}  {'vs 1x1':>6}  threads seen in each process")
    for lay, v in samples.items():
        med = statistics.median(v)
        note = "  (oversubscribed)" if lay[0] * lay[1] > cores else ""
        ratio = f"x{med / base:.2f}" if base else "-"
        print(f"  {lay[0]} x {lay[1]:<14} {med:>9.0f}  {min(v):>6.0f}-{max(v):<6.0f}  {ratio:>6}  {seen[lay]}{note}")
    full = [lay for lay in samples if lay[0] * lay[1] == cores]
    if base and full:
        best = max(full, key=lambda lay: statistics.median(samples[lay]))
        print(f"best layout using all {cores} cores: {best[0]} trial(s) x {best[1]} thread(s)")
        print(f"ratio={statistics.median(samples[best]) / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
