"""Precision and memory layout chosen by measurement, not by a capability flag.

Whether bf16 autocast or channels_last makes a run faster depends on the device *and* the models: a
CPU with AVX-512 BF16 or AMX computes bf16 natively (about x1.4 on the digits models), a CPU with
AVX-512 alone only emulates it (x0.5), and on a GPU models as small as digits' are bound by kernel
launches, where bf16 only adds casts. So ``precision: auto`` and ``channels_last: auto`` are decided
by timing a few full AKD iterations of the run's own models in each candidate and keeping the
fastest. The choice is cached per machine and models (``<cache>/speed.json``, beside the cached
digits teacher), so it is measured once; a search measures on the driver before Ray starts and hands
the choice to every trial.

Accuracy guard: bf16 rounds the activations, which can cost accuracy (the digits recipe measured
-0.74 to +0.5 points over seeds, bench/precision_accuracy.py). bf16 is therefore kept only where it
is at least ``BF16_MARGIN`` faster than the fastest fp32 candidate: a barely faster bf16 is not
worth its rounding.

This module holds the choice (``Speed``), what it depends on (the candidates, the machine, the cache key) and how a
run applies it (``resolve``); the measurement itself, which builds runs, is ``trainable.measure``.

Example::

    speed = choose_speed(cfg, teacher, data, device)   # trainable.measure: measures, or reads the cache
    run = AKDRun(cfg, teacher, data, device, speed=speed)
    print(speed.describe())
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from base import metrics as M

AUTO = "auto"
BF16_MARGIN = 1.10  # bf16 must beat the best fp32 candidate by this factor to be chosen
CACHE_FILE = "speed.json"
CACHE_VERSION = 1  # bump when what is measured changes: older entries are then measured again
# Environment variables that cap the instruction sets torch's CPU kernels use (part of the cache key).
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Speed:
    """What a run computes in: precision (fp32 | bf16) and the activations' layout.

    ``seconds`` holds the measured seconds per AKD iteration of every candidate (empty when nothing
    was measured), ``source`` says where the choice came from: measured | cached | fixed (the config
    named both) | default (not measured: fp32, contiguous); ``machine`` where it was measured.
    """

    precision: str
    channels_last: bool
    source: str = "default"
    seconds: dict[str, float] = field(default_factory=dict)
    machine: str = ""

    @property
    def name(self) -> str:
        return variant_name(self.precision, self.channels_last)

    @property
    def speedup(self) -> float | None:
        """How much faster the choice is than fp32 with contiguous tensors, where both were measured."""
        base = self.seconds.get(variant_name("fp32", False))
        mine = self.seconds.get(self.name)
        return base / mine if base and mine else None

    def describe(self) -> str:
        """One line for the terminal: what was chosen, from where, and how much faster it is."""
        if self.source in ("fixed", "default"):
            return f"speed: {self.name} ({'as configured' if self.source == 'fixed' else 'not measured'})"
        others = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        gain = f", x{self.speedup:.2f} against fp32" if self.speedup else ""
        return f"speed: {self.name} ({self.source}{gain}; per iteration: {others})"

    def record(self) -> dict[str, Any]:
        """Plain data for search.json, final.json and the checkpoint."""
        out = asdict(self)
        out["speedup"] = self.speedup
        return out

    @staticmethod
    def from_record(rec: dict[str, Any]) -> Speed:
        return Speed(str(rec["precision"]), bool(rec["channels_last"]), str(rec.get("source", "cached")),
                     {str(k): float(v) for k, v in (rec.get("seconds") or {}).items()}, str(rec.get("machine", "")))


def variant_name(precision: str, channels_last: bool) -> str:
    return f"{precision}{' channels_last' if channels_last else ''}"


def resolve(cfg, speed: Speed | None) -> tuple[str, bool]:
    """The precision and layout a run of ``cfg`` uses: the config's own where it names them, else ``speed``'s
    (a measured choice), else fp32 with contiguous tensors (the unmeasured, always-safe default)."""
    chosen = speed or Speed("fp32", False)
    precision = chosen.precision if cfg.precision == AUTO else cfg.precision
    channels_last = chosen.channels_last if cfg.channels_last == AUTO else bool(cfg.channels_last)
    return precision, channels_last


def candidates(cfg, device: torch.device) -> list[tuple[str, bool]]:
    """The (precision, channels_last) pairs ``auto`` chooses among for ``cfg`` on ``device``."""
    if cfg.precision != AUTO:
        precisions = [cfg.precision]
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ["fp32"]
    else:  # a CPU always runs bf16, natively or emulated: the timing tells which
        precisions = ["fp32", "bf16"]
    layouts = [False, True] if cfg.channels_last == AUTO else [bool(cfg.channels_last)]
    return [(p, cl) for p in precisions for cl in layouts]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block (a trial's, for measurements on the driver) and put
    back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_native() -> bool | None:
    """Whether this CPU computes bf16 natively (x86: AVX-512 BF16 or AMX-BF16; Arm: the BF16 extension, and
    oneDNN not capped below them by ``ONEDNN_MAX_CPU_ISA``); None where the flags cannot be read. Reported for
    people; the choice itself is timed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap != "ALL" and not any(word in cap for word in ("BF16", "AMX", "FP16", "AVX10")):
        return False  # oneDNN told not to use the CPU's bf16 instructions: it emulates them
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_description(device: torch.device) -> str:
    """E.g. 'cpu Intel(R) Xeon(R) Processor, native bf16: no, 2 threads, torch 2.14.1'."""
    if device.type == "cuda":
        return f"cuda {device_name(device)}, torch {torch.__version__}"
    native = {True: "yes", False: "no", None: "unknown"}[cpu_bf16_native()]
    n = torch.get_num_threads()
    return f"cpu {cpu_name()}, native bf16: {native}, {n} thread{'s' * (n != 1)}, torch {torch.__version__}"


def cache_key(cfg, device: torch.device, teacher_params: int) -> str:
    """What decides which candidate is fastest: the device and its model, torch, threads, the models and the
    loop's shape. Learning rates and seeds do not."""

    t = cfg.task_spec
    parts = {
        "v": CACHE_VERSION, "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "isa": [torch.backends.cpu.get_cpu_capability(), *(os.environ.get(v, "") for v in ISA_VARIABLES)],
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "teacher": cfg.teacher, M.TEACHER_PARAMS: int(teacher_params), "student": cfg.student,
        "student_width": cfg.student_width, "student_fraction": cfg.student_fraction, "generator": cfg.generator,
        "latent_dim": cfg.latent_dim, "generator_width": cfg.generator_width, "batch_size": cfg.batch_size,
        "n_student": cfg.n_student, "n_generator": cfg.n_generator, "method": cfg.method,
        "image": [t.channels, t.image_size, t.num_classes], "bn_loss": cfg.w_bn > 0,
        "align": cfg.w_feature > 0 or cfg.w_feature_adv > 0,
        "candidates": [variant_name(p, cl) for p, cl in candidates(cfg, device)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pick(seconds: dict[str, float]) -> tuple[str, bool]:
    """The fastest candidate, bf16 only where it beats the fastest fp32 one by ``BF16_MARGIN``."""
    def parse(name: str) -> tuple[str, bool]:
        return name.split()[0], name.endswith("channels_last")

    fastest = min(seconds, key=seconds.get)
    fp32 = {k: v for k, v in seconds.items() if k.startswith("fp32")}
    if fastest.startswith("bf16") and fp32:
        best_fp32 = min(fp32, key=fp32.get)
        if seconds[best_fp32] < BF16_MARGIN * seconds[fastest]:
            return parse(best_fp32)
    return parse(fastest)
