"""One frozen configuration for an AKD run, built from a flat dict and validated once.

Precedence: dataclass defaults < the task's defaults < the caller's values. Every problem (unknown
key, wrong type, impossible value, unknown registry name) is collected and raised together as one
``ConfigError`` naming each key, so a misspelt key can never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from trainable.errors import ConfigError

SCHEDULERS = ("multistep", "cosine", "exponential", "none")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class AKDConfig:
    # --- what is distilled
    task: str = "digits"  # key of trainable.tasks.TASKS
    seed: int = 0  # seeds models, noise and the validation/test split
    teacher: str = "cnn"  # teacher architecture (tasks set their own)
    student: str = "cnn"  # student architecture
    student_width: float = 1.0  # width multiplier of the student family
    student_fraction: float | None = None  # if set: width whose params are closest to this share of the teacher's
    generator: str = "dfad"  # "dfad" (DFAD's GeneratorA) or "deconv" (DCGAN-style); "a" is read as "dfad"
    latent_dim: int = 100  # generator noise size
    generator_width: int = 64  # generator base channels
    # --- budget and loop
    epochs: int = 30  # epochs; each evaluates on validation once
    iters_per_epoch: int = 20  # AKD iterations per epoch
    batch_size: int = 128  # synthetic images per step
    n_student: int = 5  # student (imitation) steps per iteration
    n_generator: int = 1  # generator (adversarial) steps per iteration
    early_stop_patience: int = 0  # stop after this many epochs without a better val_acc; 0 = never
    # --- losses
    student_loss: str = "l1"  # l1 | l2 | kl
    generator_loss: str = "neg_l1"  # neg_l1 | neg_log_l2 | neg_kl
    temperature: float = 1.0  # for kl / neg_kl
    w_onehot: float = 0.0  # DAFL one-hot loss weight (generator)
    w_activation: float = 0.0  # DAFL activation loss weight (generator)
    w_balance: float = 0.0  # DAFL class-balance (information entropy) weight (generator)
    w_bn: float = 0.0  # BatchNorm-statistics loss weight (DeepInversion / DFQ) (generator)
    # --- optimisation
    lr_student: float = 0.1  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 5e-4  # SGD weight decay
    lr_generator: float = 1e-3  # Adam learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    scheduler: str = "multistep"  # multistep | cosine | exponential | none (both optimisers, per epoch)
    milestones: tuple[float, ...] = (0.2, 0.4)  # multistep: fractions of the epochs
    gamma: float = 0.1  # multistep factor, or exponential per-epoch factor
    # --- evaluation and data
    val_fraction: float = 0.2  # torchvision tasks: share of the official test split used for validation
    eval_batch_size: int = 1024
    # --- speed
    # auto: bf16 autocast where the device computes bf16 natively (CUDA; CPUs with AVX-512 BF16/AMX),
    # else fp32. On by default because digits' held-out accuracy stays within 1 point of fp32 over 3
    # seeds (bench/precision_accuracy.py) while CIFAR-shape steps run ~1.8x faster than fp32 on such a CPU.
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True  # NHWC activations for teacher and student (preferred by oneDNN and cuDNN)

    @property
    def lr_milestone_epochs(self) -> list[int]:
        return sorted({max(1, int(round(m * self.epochs))) for m in self.milestones})


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(AKDConfig)}
_HINTS = typing.get_type_hints(AKDConfig)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(key: str, value: Any) -> Any:
    """Check one value against its field's type; ints are accepted for floats. Raises ValueError."""
    hint, optional = _base_type(_HINTS[key])
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: must not be empty")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a name, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{key}: expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    raise TypeError(f"unhandled type for {key}: {hint}")  # a bug, not a user error


def parse_value(key: str, text: str) -> Any:
    """Parse a ``--set key=value`` string into the field's type (validation happens later)."""
    if key not in FIELDS:
        return text  # reported as unknown by build_config
    hint, optional = _base_type(_HINTS[key])
    t = text.strip()
    if optional and t.lower() in ("none", "null", ""):
        return None
    try:
        if hint is bool:
            if t.lower() in ("true", "1", "yes"):
                return True
            if t.lower() in ("false", "0", "no"):
                return False
            return t
        if hint is int:
            return int(t)
        if hint is float:
            return float(t)
        if typing.get_origin(hint) is tuple:
            return tuple(float(v) for v in t.strip("()[]").split(",") if v.strip())
    except ValueError:
        return t  # kept as text; validation names the key
    return t


def _check_values(c: dict[str, Any]) -> list[str]:
    """Range and registry checks on coerced values."""
    from trainable.losses import GENERATOR_LOSSES, STUDENT_LOSSES
    from trainable.models import CLASSIFIERS, GENERATORS
    from trainable.tasks import TASKS

    errs = []

    def need(ok: bool, msg: str):
        if not ok:
            errs.append(msg)

    for key, table in (("task", TASKS), ("teacher", CLASSIFIERS), ("student", CLASSIFIERS),
                       ("generator", GENERATORS), ("student_loss", STUDENT_LOSSES),
                       ("generator_loss", GENERATOR_LOSSES)):
        need(c[key] in table, f"{key}: unknown {c[key]!r}; choose from {sorted(table)}")
    need(c["scheduler"] in SCHEDULERS, f"scheduler: unknown {c['scheduler']!r}; choose from {list(SCHEDULERS)}")
    need(c["precision"] in PRECISIONS, f"precision: unknown {c['precision']!r}; choose from {list(PRECISIONS)}")
    for key in ("epochs", "iters_per_epoch", "batch_size", "n_student", "n_generator", "latent_dim",
                "generator_width", "eval_batch_size"):
        need(c[key] >= 1, f"{key}: must be >= 1, got {c[key]}")
    need(c["early_stop_patience"] >= 0, f"early_stop_patience: must be >= 0, got {c['early_stop_patience']}")
    for key in ("lr_student", "lr_generator", "temperature", "student_width"):
        need(c[key] > 0, f"{key}: must be > 0, got {c[key]}")
    for key in ("w_onehot", "w_activation", "w_balance", "w_bn", "weight_decay", "momentum"):
        need(c[key] >= 0, f"{key}: must be >= 0, got {c[key]}")
    for key in ("beta1", "beta2"):
        need(0 <= c[key] < 1, f"{key}: must be in [0, 1), got {c[key]}")
    need(0 < c["gamma"] <= 1, f"gamma: must be in (0, 1], got {c['gamma']}")
    need(0 < c["val_fraction"] < 1, f"val_fraction: must be in (0, 1), got {c['val_fraction']}")
    if c["student_fraction"] is not None:
        need(0 < c["student_fraction"] < 1, f"student_fraction: must be in (0, 1), got {c['student_fraction']}")
    need(all(0 < m < 1 for m in c["milestones"]), f"milestones: fractions of the epochs in (0, 1), got {list(c['milestones'])}")
    need(not (c["nesterov"] and c["momentum"] == 0), "nesterov: needs momentum > 0")
    return errs


def build_config(values: dict[str, Any], task_defaults: bool = True) -> AKDConfig:
    """Build and validate an ``AKDConfig``.

    Args:
        values: flat dict of overrides (from ``--set``, a Tune config, a checkpoint...).
        task_defaults: apply the task's defaults beneath ``values``.

    Raises:
        ConfigError: listing every unknown key, wrong type and impossible value.
    """
    from trainable.tasks import TASKS

    errs = [f"{k}: unknown key; valid keys are {sorted(FIELDS)}" for k in values if k not in FIELDS]
    merged: dict[str, Any] = {f.name: f.default for f in fields(AKDConfig)}
    task = values.get("task", merged["task"])
    if task_defaults and isinstance(task, str) and task in TASKS:
        merged.update(TASKS[task].defaults)
    merged.update({k: v for k, v in values.items() if k in FIELDS})
    coerced: dict[str, Any] = {}
    for key, value in merged.items():
        try:
            coerced[key] = _coerce(key, value)
        except ValueError as e:
            errs.append(str(e))
    if not errs:
        from trainable.models import GENERATOR_ALIASES

        coerced["generator"] = GENERATOR_ALIASES.get(coerced["generator"], coerced["generator"])
        errs.extend(_check_values(coerced))
    if errs:
        raise ConfigError("invalid config: " + "; ".join(errs))
    return AKDConfig(**coerced)


def config_to_dict(cfg: AKDConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["milestones"] = list(cfg.milestones)
    return d
