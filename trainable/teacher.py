"""Teachers: load a user's checkpoint (checked), or train one (digits on the fly, cached).

Checkpoints are read with ``torch.load(..., weights_only=True)`` only. Accepted forms: a raw
state_dict, or a dict holding it under ``state_dict`` or ``model``; keys may carry the
``module.`` prefix of DataParallel.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from base.errors import CheckpointError, UserError
from base.files import cache_dir, torch_save
from trainable import sources
from trainable.models import CLASSIFIERS, build_classifier, classifier_head
from trainable.outputs import teacher_metrics
from trainable.tasks import Task, load_eval_data, load_teacher_train


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors, or one under "
                              "'state_dict' or 'model'); save the teacher with torch.save(model.state_dict(), PATH)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


# What a user does about a teacher of another architecture, for each command.
ARCH_HINT = ("name its architecture: run_akd.py --set teacher=NAME, run_search.py with 'fixed: {teacher: NAME}' "
             "in the space, train_teacher.py --arch NAME; NAME one of")


def load_teacher(path: str | os.PathLike, arch: str, task: Task) -> nn.Module:
    """Build ``arch`` for ``task`` and load the checkpoint at ``path`` into it.

    Raises:
        CheckpointError: missing or corrupt file, wrong class count or architecture.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"teacher checkpoint not found: {path}; pass --teacher PATH to a state_dict file")
    try:
        with warnings.catch_warnings():  # our one line says what is wrong; torch's warnings would bury it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read teacher checkpoint {path} ({type(e).__name__}): corrupt, or holds "
                              "objects other than tensors; save it with torch.save(model.state_dict(), PATH)") from None
    state = _extract_state_dict(obj, path)
    try:
        model = build_classifier(arch, task.num_classes, task.channels, task.image_size)
    except ValueError as e:
        raise UserError(f"teacher: {e}") from None
    try:
        _check_head(model, classifier_head(model), state, task)
    except ValueError:  # no linear head to read the class count from: the forward check sees the output
        pass
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    hint = ARCH_HINT if arch in CLASSIFIERS else "pass the weights of this model, or name the model they were saved from:"
    names = sorted(CLASSIFIERS) if arch in CLASSIFIERS else "torchvision:NAME, timm:NAME, package.module:callable"
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit teacher architecture {arch!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; {hint} {names}")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"checkpoint does not fit teacher architecture {arch!r}: {k} has shape "
                              f"{tuple(state[k].shape)}, expected {tuple(expected[k].shape)} "
                              f"({len(bad)} tensors differ); {hint} {names}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"teacher checkpoint {path} has non-finite weights (NaN/Inf) in {len(nonfinite)} "
                              f"tensor(s), e.g. {nonfinite[0]}; pass a teacher whose training converged")
    model.load_state_dict(state)
    return model


def _check_head(model: nn.Module, head: nn.Linear, state: dict[str, torch.Tensor], task: Task) -> None:
    """The class count of the checkpoint's head against the task's."""
    head_key = next(f"{name}.weight" for name, m in model.named_modules() if m is head)
    if head_key in state and state[head_key].ndim == 2 and state[head_key].shape[0] != task.num_classes:
        raise CheckpointError(f"checkpoint has {state[head_key].shape[0]} output classes; task {task.name} needs "
                              f"{task.num_classes}; pass a teacher trained on {task.name}")


def _augment(x: torch.Tensor, task: Task) -> torch.Tensor:
    """Random translation by padding and cropping (and horizontal flips for CIFAR)."""
    pad = 1 if task.image_size <= 8 else (2 if task.channels == 1 else 4)
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    out = padded[:, :, dy:dy + h, dx:dx + w]
    if task.channels == 3 and torch.rand(()) < 0.5:
        out = out.flip(3)
    return out


def train_teacher(task: Task, arch: str, seed: int = 0, epochs: int = 200, lr: float = 0.1,
                  batch_size: int = 128, weight_decay: float = 5e-4, data_root: str | None = None,
                  device: torch.device | None = None, log=print,
                  train_data: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False) -> nn.Module:
    """Supervised training of a teacher: SGD (momentum 0.9, Nesterov), cosine schedule, shift augmentation.

    With the defaults this is the standard CIFAR recipe (SGD 0.1, momentum 0.9, wd 5e-4, 200 epochs).
    ``progress``: a bar with epoch, loss and ETA when stdout is a terminal (else ``log`` lines).
    """
    bar = None
    if progress and sys.stdout.isatty():
        bar = tqdm(total=epochs, unit="epoch", desc="teacher", dynamic_ncols=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = train_data if train_data is not None else load_teacher_train(task, seed, data_root)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_classifier(arch, task.num_classes, task.channels, task.image_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = _augment(x[idx], task).to(device), y[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total / len(y):.4f}")
        elif log and (epoch + 1) % max(1, epochs // 10) == 0:
            log(f"teacher epoch {epoch + 1}/{epochs} loss {total / len(y):.4f}")
    if bar is not None:
        bar.close()
    model.zero_grad(set_to_none=True)
    return model.eval()


# Supervised recipe for the on-the-fly digits teacher (a few seconds on a 2-core CPU).
DIGITS_TEACHER_RECIPE = dict(epochs=60, lr=0.05, batch_size=64, weight_decay=5e-4)


def prepare_teacher(task: Task, arch: str | None = None, teacher_path: str | None = None, seed: int = 0,
                    data_root: str | None = None, log=print, batch_size: int = 64) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher of a run or search, prepared once.

    digits: trained on its teacher-train split and cached by (task, seed, arch) unless
    ``teacher_path`` is given. Other tasks: loaded from ``teacher_path`` and checked as a run uses it
    (``sources.check_forward`` at ``batch_size``, the run's, and a small batch).

    Returns:
        (teacher in eval mode on CPU, info dict with ``arch``, ``source``).
    """
    arch = arch or task.teacher
    if sources.is_program(arch):
        if teacher_path:
            raise UserError(f"the teacher {arch} is an exported program: its weights are inside it; drop --teacher")
        model = sources.load_program(arch)
        sources.check_forward(model, arch, task.num_classes, task.channels, task.image_size, need_grad=True,
                              batch_size=batch_size, log=log, frozen=True)
        return model.eval(), {"arch": arch, "source": arch}
    if teacher_path:
        model = load_teacher(teacher_path, arch, task).eval()
        sources.check_forward(model, arch, task.num_classes, task.channels, task.image_size, need_grad=True,
                              batch_size=batch_size, log=log, frozen=True)
        return model, {"arch": arch, "source": str(teacher_path)}
    if sources.is_foreign(arch):
        raise UserError(f"the teacher {arch} needs its trained weights: pass --teacher PATH (a state_dict saved with "
                        "torch.save(model.state_dict(), PATH))")
    if task.name != "digits":
        raise UserError(f"task {task.name} needs a pretrained teacher: pass --teacher PATH "
                        "(train one with python trainable/train_teacher.py)")
    path = cache_dir() / "teachers" / f"{task.name}-{arch}-seed{seed}.pt"
    if path.exists():
        try:
            return load_teacher(path, arch, task).eval(), {"arch": arch, "source": str(path)}
        except CheckpointError:
            if log:
                log(f"cached teacher {path} is unreadable; training it again")
    if log:
        log(f"training the {task.name} teacher on first use ({arch}, seed {seed}; about 10 s on 2 CPU cores); "
            f"cached at {path} for later runs")
    start = time.perf_counter()
    model = train_teacher(task, arch, seed, device=torch.device("cpu"), log=None, **DIGITS_TEACHER_RECIPE)
    if log:
        log(f"teacher trained in {time.perf_counter() - start:.0f} s")
    torch_save(model.state_dict(), path)  # atomic: concurrent preparers never see a partial file
    return model.eval(), {"arch": arch, "source": str(path)}


def teacher_accuracy(teacher: nn.Module, task: Task, seed: int = 0,
                     data_root: str | None = None) -> dict[str, float | None]:
    """``teacher_val_acc`` and ``teacher_test_acc`` of a teacher on the task's evaluation data (None without labels)."""
    return teacher_metrics(teacher, load_eval_data(task, seed, data_root=data_root))
