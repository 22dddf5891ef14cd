"""Tasks: what is distilled (evaluation data, image shape, teacher and student families, defaults).

A data-free run reads only evaluation data: for ``digits`` the validation and test parts of a
seeded split, for the torchvision tasks the official *test* split, itself split by seed into
validation (selection) and test (reported once). The teacher's training data is reachable only
through :func:`load_teacher_train`, which refuses while a data-free run is active
(:func:`data_free`), so the guarantee is enforced in code rather than by convention.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from base.errors import DataFreeViolation, UserError, unknown
from trainable import images
from trainable.tasklist import TASK_FORMS, TASKS, Task

__all__ = ["TASKS", "Task", "EvalData", "get_task", "resolve_task", "task_problem", "load_eval_data",
           "load_teacher_train", "data_free"]


@dataclass(frozen=True)
class EvalData:
    """Evaluation tensors of a task: images normalised, (N, C, H, W) float32; labels (N,) int64, or None for a task
    without labels (its images, possibly none, are unlabelled held-out images)."""
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None

    @property
    def labelled(self) -> bool:
        return self.val_y is not None and self.test_y is not None


def get_task(name: str) -> Task:
    """A registered task, or a folder of the user's images (``folder:PATH``). Raises UserError (one line)."""
    if images.is_folder_task(name):
        return images.folder_task(name[len(images.FOLDER):])
    if name not in TASKS:
        raise UserError(unknown(f"unknown task {name!r}", sorted(TASKS), TASK_FORMS))
    return TASKS[name]



def resolve_task(name: Any) -> tuple[Task | None, str | None]:
    """(the task ``name`` names, None), or (None, why it names none, in one line): a command resolves its task once,
    here or with ``get_task``, and passes the ``Task`` down."""
    if not isinstance(name, str):
        return None, f"task: expected a name, got {name!r}"
    if not images.is_folder_task(name) and name not in TASKS:
        return None, unknown(f"task: unknown {name!r}", sorted(TASKS), TASK_FORMS)
    try:
        return get_task(name), None
    except UserError as e:
        return None, f"task: {e}"


def kept(store: dict, key: tuple, make: Callable[[], Any], size: int = 4) -> Any:
    """``make()``'s result for ``key``, made once per process and kept in ``store`` among the ``size`` newest: what the
    trials an actor runs one after another share (a prior's images, a proxy set). Callers do not change it."""
    if key not in store:
        if len(store) >= size:
            store.pop(next(iter(store)))  # the oldest
        store[key] = make()
    return store[key]


def task_problem(name: Any) -> str | None:
    """Why ``name`` names no task, in one line, or None."""
    return resolve_task(name)[1]


# ---------------------------------------------------------------------------------------------
# The data-free guard
# ---------------------------------------------------------------------------------------------
_guard = threading.local()


@contextlib.contextmanager
def data_free() -> Iterator[None]:
    """While active (in this thread), any attempt to read the teacher's training data raises."""
    depth = getattr(_guard, "depth", 0)
    _guard.depth = depth + 1
    try:
        yield
    finally:
        _guard.depth = depth


def in_data_free_run() -> bool:
    return getattr(_guard, "depth", 0) > 0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def normalise(x: torch.Tensor, task: Task) -> torch.Tensor:
    mean = torch.tensor(task.mean).view(1, -1, 1, 1)
    std = torch.tensor(task.std).view(1, -1, 1, 1)
    return (x - mean) / std


def _digits_split(seed: int) -> dict[str, np.ndarray]:
    """Index split of the 1,797 digits: 60% teacher-train, 20% validation, 20% test, stratified."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - scikit-learn takes a second to import; only the digits task and the photos prior need it
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - scikit-learn takes a second to import; only the digits task and the photos prior need it

    y = load_digits().target
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y[rest])
    return {"teacher_train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _digits_tensors(indices: np.ndarray, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - scikit-learn takes a second to import; only the digits task and the photos prior need it

    d = load_digits()
    x = torch.from_numpy(d.images[indices].astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target[indices].astype(np.int64))
    return normalise(x, task), y


def _torchvision_split(task: Task, data_root: str | None, train: bool, download: bool):
    """The torchvision dataset object for one official split (train=True only for teachers)."""
    import torchvision.datasets as tvd  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[task.name]
    if data_root is None:
        raise UserError(f"task {task.name} needs its data: pass --data-root DIR (downloaded there when online)")
    try:
        return cls(root=data_root, train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise UserError(f"{task.name} data not found or corrupted under {data_root}: {e}; "
                        f"pass --data-root to a folder holding it, or --download when online") from e


def _dataset_tensors(ds, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if data.ndim == 3:  # MNIST: (N, H, W) uint8
        data = data[:, None]
    else:  # CIFAR: (N, H, W, C) uint8
        data = data.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(data)).float().div_(255.0)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return normalise(x, task), y


def load_eval_data(task: Task, seed: int = 0, val_fraction: float = 0.2, data_root: str | None = None,
                   download: bool = False) -> EvalData:
    """Validation and test data of a task; never touches the teacher's training data.

    Args:
        task: the run's task, resolved once (``get_task``).
        seed: seeds the validation/test split.
        val_fraction: for torchvision tasks, the share of the official test split used for
            validation (selection); the rest is the held-out test. digits uses its fixed split.
        data_root: folder of the torchvision dataset.
        download: let torchvision download when online.
    """
    if task.name == "digits":
        split = _digits_split(seed)
        vx, vy = _digits_tensors(split["val"], task)
        tx, ty = _digits_tensors(split["test"], task)
        return EvalData(vx, vy, tx, ty)
    if images.is_folder_task(task.name) and not task.labelled:
        x = normalise(images.load_unlabelled(task), task)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        half = len(x) // 2  # validation (selection) and test (reported once), like a labelled task's split
        return EvalData(x[perm[:half]], None, x[perm[half:]], None)
    if images.is_folder_task(task.name):
        x, y = images.load_folder(task)
        x = normalise(x, task)
    elif task.name == "tinyimagenet":
        x, y = images.load_tiny_val(task, data_root)
        x = normalise(x, task)
    else:
        x, y = _dataset_tensors(_torchvision_split(task, data_root, train=False, download=download), task)
    return _split(x, y, seed, val_fraction)


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, val_fraction: float) -> EvalData:
    """Held-out data split by seed into validation (``val_fraction``) and test, each at least one image."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(y) - 1, max(1, int(round(val_fraction * len(y)))))
    return EvalData(x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]])


def load_teacher_train(task: Task, seed: int = 0, data_root: str | None = None,
                       download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's training data. Refuses inside a data-free run."""
    if in_data_free_run():
        raise DataFreeViolation(f"a data-free run tried to read {task.name}'s teacher-training data")
    if task.name == "digits":
        return _digits_tensors(_digits_split(seed)["teacher_train"], task)
    if images.is_folder_task(task.name):
        raise UserError(f"task {task.name} holds held-out images only, no teacher-training data; pass the trained "
                        "teacher's weights with --teacher PATH")
    if task.name == "tinyimagenet":
        x, y = images.load_tiny_train(task, data_root)
        return normalise(x, task), y
    return _dataset_tensors(_torchvision_split(task, data_root, train=True, download=download), task)
