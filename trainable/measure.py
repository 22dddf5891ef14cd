"""Runs measured: the precision and layout of ``auto`` timed on the run's own models (``choose_speed``, bounded:
``time_candidates``), and a run trained to its end for its held-out accuracy (``fit_and_test``, what the accuracy
benchmarks measure).

The choice itself and what it depends on are ``trainable.speed``; this module builds ``AKDRun``s to time them, so
it sits above ``trainable.akd`` (which only applies a choice).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base import metrics as M
from base.errors import UserError
from base.files import cache_dir, read_json, write_json
from trainable.akd import AKDRun, default_device
from trainable.config import AKDConfig
from trainable.models import count_params
from trainable.speed import CACHE_FILE, Speed, cache_key, candidates, device_name, machine_description, pick, variant_name
from trainable.tasks import EvalData, data_free

DROP_FACTOR = 2.0  # a candidate this many times slower than the best after one timed iteration is not timed on
ROUNDS_BOUND_S = 20.0  # the timed rounds stop after the first one that ends past this many seconds


def time_candidates(cfg, teacher: torch.nn.Module, data, device: torch.device, pairs: list[tuple[str, bool]],
                    rounds: int = 3, min_seconds: float = 0.3, max_iters: int = 20,
                    data_root: str | None = None, make_run: Callable[..., Any] | None = None,
                    log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Seconds per full AKD iteration (student steps, generator steps, discriminator steps) of each candidate.

    Every candidate gets its own run (its own copy of the teacher: the layout changes a module in
    place) and one warm-up iteration (allocator, oneDNN/cuDNN kernel choice); then one timed
    iteration each, and a candidate already ``DROP_FACTOR`` times slower than the best is dropped
    (bf16 emulated on a CPU without it can be 10-30 times slower: timing it in full took minutes).
    Then up to ``rounds`` rounds time the others in turn, so the machine's noise falls on all alike,
    and the median is kept; a round runs as many iterations as fit in ``min_seconds`` (at most
    ``max_iters``), and no round starts once ``ROUNDS_BOUND_S`` have gone. A dropped candidate's
    figure is its one timed iteration. ``make_run(config, teacher)`` builds a run (tests pass a fake).
    """
    if make_run is None:
        def make_run(fixed, teacher_copy):
            return AKDRun(fixed, teacher_copy, data, device, data_root=data_root)

    names = [variant_name(p, cl) for p, cl in pairs]
    if log is not None:
        log(f"measuring precision and layout: {', '.join(names)} on {device_name(device)} (one iteration each; "
            f"those {DROP_FACTOR:g}x slower than the best are dropped, the rest timed for at most "
            f"{ROUNDS_BOUND_S:.0f} s; cached afterwards)")
    with one_line_failure(cfg, "while its speed is measured"):
        runs = {}
        for precision, cl in pairs:
            fixed = dataclasses.replace(cfg, precision=precision, channels_last=cl, selection="accuracy")  # no proxy set to build
            runs[variant_name(precision, cl)] = make_run(fixed, copy.deepcopy(teacher))
        for run in runs.values():
            _timed(run, 1, device)  # warm-up
        probe = {name: _timed(run, 1, device) for name, run in runs.items()}
        best = min(probe.values())
        kept = {name: run for name, run in runs.items() if probe[name] < DROP_FACTOR * best}
        iters = {name: max(1, min(max_iters, int(min_seconds / max(probe[name], 1e-6)))) for name in kept}
        samples: dict[str, list[float]] = {k: [] for k in kept}
        start = time.perf_counter()
        for _ in range(rounds):
            for name, run in kept.items():
                samples[name].append(_timed(run, iters[name], device) / iters[name])
            if time.perf_counter() - start > ROUNDS_BOUND_S:
                break
    return {name: statistics.median(samples[name]) if name in samples else probe[name] for name in runs}


@contextlib.contextmanager
def one_line_failure(cfg, when: str):
    """A run that fails while it is timed (a model the door checks passed that fails inside the distillation
    step, a loss that turns NaN) is one UserError line naming the models and what they did, not a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"a run of teacher {cfg.teacher} and student {cfg.student} fails {when} "
                        f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); each model passed "
                        "its door check alone, so check how they are used together (method, losses, batch size)") from None


def _timed(run, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        run.iteration()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def default_cache() -> Path:
    return cache_dir() / CACHE_FILE


def choose_speed(cfg, teacher: torch.nn.Module, data, device: torch.device, cache: Path | None = None,
                 timer: Callable[..., dict[str, float]] = time_candidates, data_root: str | None = None) -> Speed:
    """The precision and layout for runs of ``cfg`` on ``device``: as configured where the config names both,
    else from the cache, else measured (``timer``) and cached.

    Args:
        cfg: the run's config; only its ``auto`` settings are decided.
        teacher: the teacher (not changed: each candidate runs on a copy).
        data: the task's evaluation data (a run needs it; nothing is evaluated).
        device: where the runs will compute.
        cache: the cache file (default ``<cache_dir>/speed.json``).
        timer: measures seconds per iteration for a list of candidates (tests pass a fake).
    """
    pairs = candidates(cfg, device)
    if len(pairs) == 1:
        return Speed(*pairs[0], source="fixed", machine=machine_description(device))
    cache = Path(cache) if cache is not None else default_cache()
    key = cache_key(cfg, device, count_params(teacher))
    entries = read_json(cache, default={})
    entries = entries if isinstance(entries, dict) else {}
    hit = entries.get(key)
    if isinstance(hit, dict):
        try:
            return Speed.from_record({**hit, "source": "cached"})
        except (KeyError, TypeError, ValueError):
            pass  # a damaged entry is measured again
    seconds = timer(cfg, teacher, data, device, pairs, data_root=data_root)
    precision, channels_last = pick(seconds)
    speed = Speed(precision, channels_last, "measured", dict(seconds), machine_description(device))
    entries = read_json(cache, default={})  # another process may have added entries meanwhile
    entries = entries if isinstance(entries, dict) else {}
    entries[key] = {**speed.record(), "measured": time.strftime("%Y-%m-%d")}
    try:
        write_json(cache, entries)
    except OSError:  # a read-only cache costs a measurement next time, nothing else
        pass
    return speed


def fit_and_test(cfg: AKDConfig, teacher: nn.Module, data: EvalData, device: torch.device | None = None,
                 data_root: str | None = None, speed: Speed | None = None) -> float:
    """Train a run of ``cfg`` to its end in one go (no checkpoints, data-free) and return its student's held-out
    test accuracy: what the accuracy benchmarks measure. ``speed`` None: measured (or cached) like any run."""
    device = device or default_device()
    with data_free():
        speed = speed or choose_speed(cfg, teacher, data, device, data_root=data_root)
        run = AKDRun(cfg, teacher, data, device, data_root=data_root, speed=speed)
        run.fit()
    return run.measure("test")[M.TEST_ACC]


def duration(s: float) -> str:
    """Seconds as a person reads them: "45 s", "3 min 20 s", "2 h 5 min"."""
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else (f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s")


def iteration_seconds(cfg, teacher: nn.Module, data, device: torch.device, speed: Speed,
                      data_root: str | None = None) -> float:
    """Seconds per AKD iteration of runs of ``cfg`` in ``speed``'s precision and layout: the speed measurement's own
    timing where it timed them, else two timed iterations now."""
    if speed.seconds.get(speed.name):
        return speed.seconds[speed.name]
    pair = [(speed.precision, speed.channels_last)]
    return time_candidates(cfg, teacher, data, device, pair, rounds=1, max_iters=2, data_root=data_root, log=None)[speed.name]


def expected_line(cfg, epochs_left: int, seconds_per_iteration: float) -> str:
    """The one line a run prints before it trains: how long its epochs will take at the measured pace."""
    total = epochs_left * cfg.iters_per_epoch * seconds_per_iteration
    return (f"expected: about {duration(total)} for {epochs_left} epoch(s) of {cfg.iters_per_epoch} iterations at "
            f"{seconds_per_iteration:.3g} s each (measured here; each epoch's evaluation adds a little)")
