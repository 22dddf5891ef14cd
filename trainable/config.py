"""One frozen configuration for an AKD run, built from a flat dict and validated once.

Precedence: dataclass defaults < the task's defaults < the method's (``METHODS``) < the caller's values. Every problem (unknown
key, wrong type, impossible value, unknown registry name) is collected and raised together as one
``ConfigError`` naming each key, so a misspelt key can never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from base.errors import ConfigError, UserError, unknown
from trainable import sources
from trainable.losses import GENERATOR_LOSSES, STUDENT_LOSSES
from trainable.models import (
    CLASSIFIERS,
    GENERATORS,
    MODEL_FORMS,
    build_classifier,
    feature_layers,
    is_widthable,
    size_problem,
)
from trainable.priors import check_prior, folder_prior_problem
from trainable.proxy import selection_problem
from trainable.sources import is_foreign, is_program
from trainable.tasks import Task, resolve_task
from trainable.terms import term_weights

SCHEDULERS = ("multistep", "cosine", "exponential", "none")
PRECISIONS = ("auto", "fp32", "bf16")

# Distillation methods, as data: the config values each sets over the task's defaults (a caller's
# own values still win, so the terms stay composable).
METHODS: dict[str, dict[str, Any]] = {
    # DFAD (Fang et al. 2019): the student imitates the teacher on generated images, the generator
    # maximises their discrepancy.
    "dfad": {},
    # DAFL (Chen et al. 2019) terms on DFAD's loop: one-hot, activation and class-balance losses on
    # the generator, at DAFL's published weights (1, 0.1, 5).
    "dafl": {"w_onehot": 1.0, "w_activation": 0.1, "w_balance": 5.0},
    # AVKD (Tang & Lin 2020): a class-conditional generator G(z, y) and a discriminator D(x, y) against
    # prior data; the generator fools D, makes the teacher see the requested class and maximises the
    # KL between teacher and student; the student minimises that KL, at the usual distillation
    # temperature of 4 (on digits: held-out 0.956 and 0.969 over two seeds at 4, 0.936 at 1).
    "avkd": {"student_loss": "kl", "generator_loss": "neg_kl", "temperature": 4.0},
}
# Keys that only act under one method (a search space makes them conditional on it).
METHOD_KEYS = {"avkd": ("prior", "class_prior", "lr_discriminator", "n_discriminator", "discriminator_width",
                        "w_discriminator", "w_class")}


@dataclass(frozen=True)
class AKDConfig:
    # --- what is distilled, and how
    task: str = "digits"  # key of trainable.tasks.TASKS, or folder:PATH (your own labelled images)
    method: str = "dfad"  # dfad | dafl | avkd (see METHODS)
    seed: int = 0  # seeds models, noise and the validation/test split
    teacher: str = "cnn"  # teacher architecture (tasks set their own)
    student: str = "cnn"  # student architecture
    student_width: float = 1.0  # width multiplier of the student family
    student_fraction: float | None = None  # if set: width whose params are closest to this share of the teacher's
    generator: str = "dfad"  # "dfad" (DFAD's GeneratorA) or "deconv" (DCGAN-style)
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
    w_disagreement: float = 1.0  # weight of the generator's student-teacher discrepancy (generator_loss)
    # --- AVKD (method: avkd)
    prior: str = "letters"  # prior data: letters | photos | cifar10 | cifar100 | cifar90 | folder:PATH
    class_prior: tuple[float, ...] = ()  # weights of the classes G is asked for; empty = uniform
    lr_discriminator: float = 2e-4  # Adam learning rate of D (its betas and schedule are the generator's)
    n_discriminator: int = 1  # discriminator steps per iteration
    discriminator_width: int = 32  # D's base channels
    w_discriminator: float = 1.0  # generator: fool D (minimise D(G(z, y), y))
    w_class: float = 1.0  # generator: the teacher recognises the requested class (cross-entropy)
    # --- feature alignment (any method)
    w_feature: float = 0.0  # student: normalised MSE between its and the teacher's intermediate features
    w_feature_adv: float = 0.0  # generator: maximise that feature discrepancy
    feature_layers: str = "auto"  # comma list of module names, or auto: the architecture's stages/blocks
    feature_projection: bool = True  # a learned 1x1 projection where student and teacher widths differ
    # --- optimisation
    lr_student: float = 0.1  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 5e-4  # SGD weight decay
    # A student without BatchNorm has nothing to rescale its layers: at lr_student 0.22 one trained to 0.10 held
    # out, clipped at 1 to 0.90 (trainable/fitting.py).
    student_grad_clip: float = 0.0  # clip the norm of the student's gradient to this before each step; 0: off
    lr_generator: float = 1e-3  # Adam learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    scheduler: str = "multistep"  # multistep | cosine | exponential | none (both optimisers, per epoch)
    milestones: tuple[float, ...] = (0.2, 0.4)  # multistep: fractions of the epochs
    gamma: float = 0.1  # multistep factor, or exponential per-epoch factor
    # --- evaluation and data
    val_fraction: float = 0.2  # torchvision tasks: share of the official test split used for validation
    eval_batch_size: int = 1024  # images per forward when measuring validation and test
    # --- selection (trainable/proxy.py)
    selection: str = "auto"  # accuracy | agreement (with the teacher, no labels needed) | auto: accuracy where labelled
    proxy: str = "auto"  # agreement's held-out images: auto | generator | folder:PATH
    proxy_images: int = 1000  # generator proxy: images per half (validation, test)
    # --- speed
    # auto: the fastest of the candidates, timed once per machine and models and cached
    # (trainable/speed.py); bf16 only where it is clearly faster than fp32 (a CPU that emulates bf16
    # runs it at half fp32's speed).
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    channels_last: bool | str = "auto"  # auto | true | false: NHWC activations for teacher and student
    # PyTorch's deterministic algorithms where they exist, cuDNN benchmarking off (a GPU's runs repeat bit for bit,
    # a little slower; a CPU's do already)
    deterministic: bool = False
    # The task, resolved once where the config is built (``build_config``): not a key (never set, never written);
    # every part of a run reads the task's shape, classes and recipe here rather than resolving its name again.
    task_spec: Task | None = field(default=None, compare=False, repr=False)

    @property
    def lr_milestone_epochs(self) -> list[int]:
        return sorted({max(1, int(round(m * self.epochs))) for m in self.milestones})


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(AKDConfig) if f.name != "task_spec"}
_HINTS = typing.get_type_hints(AKDConfig)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


# Settings that take true, false or auto (decided by measurement, trainable/speed.py).
BOOL_OR_AUTO = ("channels_last",)


def _coerce(key: str, value: Any) -> Any:
    """Check one value against its field's type; ints are accepted for floats. Raises ValueError."""
    if key in BOOL_OR_AUTO:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"{key}: expected true, false or auto, got {value!r}")
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
    if key in BOOL_OR_AUTO:
        hint = str if t.lower() == "auto" else bool
        t = t.lower() if t.lower() == "auto" else t
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


def _check_values(c: dict[str, Any], task: Task | None, problem: str | None) -> list[str]:
    """Range and registry checks on coerced values; ``task`` the task resolved (None: ``problem`` says why not)."""
    errs = []

    def need(ok: bool, msg: str):
        if not ok:
            errs.append(msg)

    if problem:
        errs.append(problem)
    for key, table in (("method", METHODS), ("generator", GENERATORS), ("student_loss", STUDENT_LOSSES),
                       ("generator_loss", GENERATOR_LOSSES)):
        need(c[key] in table, unknown(f"{key}: unknown {c[key]!r}", sorted(table)))
    for role in ("teacher", "student"):
        errs.extend(_check_model(role, c[role]))
        size = None if problem or c[role] not in CLASSIFIERS else size_problem(c[role], task.image_size)
        need(size is None, f"{role}: {size}")
    if c["student_fraction"] is not None and not _check_model("student", c["student"]):
        need(is_widthable(c["student"]), f"student_fraction: the student {c['student']} has no width multiplier to "
             "size it by (a factory of your own is sized where it takes width_mult=); drop student_fraction "
             "(student_fraction=none) and choose students by name")
    need(c["scheduler"] in SCHEDULERS, unknown(f"scheduler: unknown {c['scheduler']!r}", list(SCHEDULERS)))
    need(c["precision"] in PRECISIONS, unknown(f"precision: unknown {c['precision']!r}", list(PRECISIONS)))
    for key in ("epochs", "iters_per_epoch", "batch_size", "n_student", "n_generator", "latent_dim",
                "generator_width", "eval_batch_size", "n_discriminator", "discriminator_width"):
        need(c[key] >= 1, f"{key}: must be >= 1, got {c[key]}")
    need(c["early_stop_patience"] >= 0, f"early_stop_patience: must be >= 0, got {c['early_stop_patience']}")
    for key in ("lr_student", "lr_generator", "lr_discriminator", "temperature", "student_width"):
        need(c[key] > 0, f"{key}: must be > 0, got {c[key]}")
    for key in (*(k for k in term_weights() if k in c), "weight_decay", "momentum", "student_grad_clip"):
        need(c[key] >= 0, f"{key}: must be >= 0, got {c[key]}")
    for key in ("beta1", "beta2"):
        need(0 <= c[key] < 1, f"{key}: must be in [0, 1), got {c[key]}")
    need(0 < c["gamma"] <= 1, f"gamma: must be in (0, 1], got {c['gamma']}")
    need(0 < c["val_fraction"] < 1, f"val_fraction: must be in (0, 1), got {c['val_fraction']}")
    if c["student_fraction"] is not None:
        need(0 < c["student_fraction"] < 1, f"student_fraction: must be in (0, 1), got {c['student_fraction']}")
    need(all(0 < m < 1 for m in c["milestones"]), f"milestones: fractions of the epochs in (0, 1), got {list(c['milestones'])}")
    need(not (c["nesterov"] and c["momentum"] == 0), "nesterov: needs momentum > 0")
    need(8 <= c["proxy_images"] <= 100_000, f"proxy_images: must be in [8, 100000], got {c['proxy_images']}")

    errs.extend(selection_problem(c["selection"], c["proxy"], task))
    if not problem:
        errs.extend(_check_method(c, task))
    return errs


def _check_model(role: str, spec: str) -> list[str]:
    """A teacher or student spec: a registered name or a foreign model that can be found (not built yet)."""
    if sources.is_foreign(spec):
        problem = sources.check_spec(spec, role)
        return [problem] if problem else []
    if spec not in CLASSIFIERS:
        return [unknown(f"{role}: unknown {spec!r}", sorted(CLASSIFIERS), f"or name one as {MODEL_FORMS}")]
    return []


def _check_method(c: dict[str, Any], task) -> list[str]:
    """AVKD's prior and class prior, and feature alignment's layers, against the task and the models."""
    errs = []
    problem = check_prior(c["prior"], task) or folder_prior_problem(c["prior"])
    if problem:
        errs.append(problem)
    cp = c["class_prior"]
    if cp and (len(cp) != task.num_classes or min(cp) < 0 or sum(cp) <= 0):
        errs.append(f"class_prior: expected {task.num_classes} weights >= 0 with a positive sum (one per class of "
                    f"{task.name}), or [] for uniform; got {len(cp)} values")
    # Layers named by hand are checked whether or not alignment is on (a typo is found before it is switched on).
    if ((c["w_feature"] > 0 or c["w_feature_adv"] > 0 or c["feature_layers"] != "auto") and not is_program(c["teacher"])
            and not _check_model("teacher", c["teacher"]) and not _check_model("student", c["student"])):
        errs.extend(_check_feature_layers(c, task))
    return errs


def _check_feature_layers(c: dict[str, Any], task) -> list[str]:
    import torch  # noqa: PLC0415 - torch only to check feature layers: the space's checks run without it otherwise

    found = {}
    for role in ("teacher", "student"):
        try:
            with torch.device("meta"):
                model = build_classifier(c[role], task.num_classes, task.channels, task.image_size)
        except (UserError, ValueError) as e:
            return [f"{role}: {e}"]
        names = feature_layers(c[role], c["feature_layers"], model)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if not names:
            return [f"feature_layers: {c[role]} has no default layers; name them, e.g. feature_layers: layer1,layer2"]
        if missing:
            some = [n for n in modules if n and n.count(".") <= 1][:12]
            return [unknown(f"feature_layers: {missing[0]!r} is not a layer of the {role} {c[role]}", some, "...")]
        found[role] = names
    if len(found["teacher"]) != len(found["student"]):
        return [f"feature_layers: alignment pairs layers in order, but the teacher {c['teacher']} has "
                f"{len(found['teacher'])} and the student {c['student']} {len(found['student'])}; name the same "
                "number for both (feature_layers: a,b,c)"]
    return []


def recipe_value(cfg: AKDConfig, key: str) -> Any:
    """The value of ``key`` that the task's recipe and the method give (what a run of ``cfg`` gets where it sets none
    itself)."""
    values = {k: f.default for k, f in FIELDS.items()}
    if cfg.task_spec is not None:
        values.update(cfg.task_spec.defaults)
    values.update(METHODS.get(cfg.method, {}))
    return values[key]


def build_config(values: dict[str, Any], task_defaults: bool = True, task: Task | None = None) -> AKDConfig:
    """Build and validate an ``AKDConfig``.

    Args:
        values: flat dict of overrides (from ``--set``, a Tune config, a checkpoint...).
        task_defaults: apply the task's defaults beneath ``values``.
        task: the task, where the caller resolved it already (a search's plan, a trial): not resolved again by name;
            None: resolved here from ``values``' ``task``.

    Raises:
        ConfigError: listing every unknown key, wrong type and impossible value.
    """
    errs = [f"{k}: unknown key; valid keys are {sorted(FIELDS)}" for k in values if k not in FIELDS]
    merged: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}
    name = values.get("task", task.name if task is not None else merged["task"])
    problem = None
    if task is None:
        task, problem = resolve_task(name)
    elif name != task.name:
        errs.append(f"task: {name!r} is not the run's task {task.name!r}; drop it or name {task.name!r}")
    merged["task"] = name
    if task_defaults and task is not None:
        merged.update(task.defaults)
    method = values.get("method", merged["method"])
    if task_defaults and isinstance(method, str) and method in METHODS:
        merged.update(METHODS[method])
    merged.update({k: v for k, v in values.items() if k in FIELDS})

    if ("student_fraction" not in values and isinstance(merged["student"], str) and is_foreign(merged["student"])
            and not _check_model("student", merged["student"]) and not is_widthable(merged["student"])):
        merged["student_fraction"] = None  # the task's default size does not apply to a student without a width
    coerced: dict[str, Any] = {}
    for key, value in merged.items():
        try:
            coerced[key] = _coerce(key, value)
        except ValueError as e:
            errs.append(str(e))
    if not errs:
        errs.extend(_check_values(coerced, task, problem))
    if errs:
        raise ConfigError("invalid config: " + "; ".join(errs))
    return AKDConfig(**coerced, task_spec=task)


def config_to_dict(cfg: AKDConfig) -> dict[str, Any]:
    """Plain data (tuples as lists): what config.json and checkpoints hold (the resolved task is not a key)."""
    return {k: list(v) if isinstance(v, tuple) else v for k in FIELDS for v in [getattr(cfg, k)]}
