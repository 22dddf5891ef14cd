"""Selection without labels: the student's agreement with the teacher on held-out images nobody labelled.

A run selects (ranks its epochs, a search its trials) on ``selection``:

- ``accuracy``: validation accuracy, ``val_acc`` (needs labelled held-out images);
- ``agreement``: ``val_agreement``, the share of the proxy set's validation half on which the student's class
  (argmax) is the teacher's; the other half gives ``test_agreement``, reported once like ``test_acc``;
- ``auto`` (the default): accuracy where the task has labels, else agreement.

The proxy set (``proxy``) is:

- ``auto``: a label-free task's own unlabelled images when it has at least ``MIN_IMAGES`` of them, else an
  AVKD prior folder's images (``prior: folder:PATH``), else the generator's;
- ``generator``: ``proxy_images`` images of a frozen, randomly initialised generator seeded apart from every
  run (``PROXY_SEED``), so every trial and seed of a search is judged on the same images; its BatchNorm uses
  batch statistics, which spreads the images over the teacher's classes (with running statistics a random
  generator's images fall into one class);
- ``folder:PATH``: every image under PATH (read like an AVKD prior folder), labels not needed.

Images are split in two halves by the fixed seed: validation (selection) and test. The teacher's classes
on them are computed once per run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from base import metrics as M
from base.errors import UserError, unknown
from trainable.images import IMAGE_SUFFIXES, image_files
from trainable.models import build_generator
from trainable.priors import load_prior
from trainable.tasks import Task, kept

SELECTIONS = ("auto", "accuracy", "agreement")
PROXY_SEED = 1_000_003  # the generator proxy's seed: apart from every run's (trials use small seeds)
MIN_IMAGES = 16  # fewer unlabelled images than this: the generator's images are used instead
CHUNK = 256  # images per generator or evaluation pass


def agreement_selected(selection: str, task) -> bool:
    """Whether a run of ``task`` with this ``selection`` selects on agreement."""
    return selection == "agreement" or (selection == "auto" and not task.labelled)


def selection_metric(selection: str, task) -> str:
    """The metric a run with this ``selection`` selects on: ``val_acc`` or ``val_agreement``."""
    return M.VAL_AGREEMENT if agreement_selected(selection, task) else M.VAL_ACC


def selection_problem(selection: Any, proxy: Any, task) -> list[str]:
    """What is wrong with ``selection`` and ``proxy`` for ``task`` (one line each), or []."""
    errs = []
    if selection not in SELECTIONS:
        errs.append(unknown(f"selection: unknown {selection!r}", list(SELECTIONS)))
    elif selection == "accuracy" and task is not None and not task.labelled:
        errs.append(f"selection: accuracy needs labelled images, and the task {task.name} has none; select on "
                    "agreement with the teacher (selection: agreement, or leave it out)")
    if not isinstance(proxy, str) or not (proxy in ("auto", "generator") or
                                          (proxy.startswith("folder:") and len(proxy) > len("folder:"))):
        errs.append(unknown(f"proxy: unknown {proxy!r}", ["auto", "generator", "folder:PATH"]))
    elif proxy.startswith("folder:"):
        path = Path(proxy[len("folder:"):]).expanduser()
        if not path.is_dir():
            errs.append(f"proxy: {path} is not a folder; pass folder:PATH of unlabelled images")
        elif len(image_files(path)) < 2:
            errs.append(f"proxy: {path} holds fewer than 2 images ({', '.join(IMAGE_SUFFIXES)}); add images or use "
                        "proxy: generator")
    return errs


@dataclass(frozen=True)
class Proxy:
    """The held-out images agreement is measured on (normalised, on the CPU), and where they came from."""
    val_x: torch.Tensor
    test_x: torch.Tensor
    source: str


def _halves(x: torch.Tensor, source: str) -> Proxy:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(PROXY_SEED))
    half = len(x) // 2
    return Proxy(x[perm[:half]].contiguous(), x[perm[half:]].contiguous(), source)


def generator_images(task: Task, n: int, seed: int = PROXY_SEED) -> torch.Tensor:
    """``n`` images of the task's default generator at random initialisation (fixed ``seed``), normalised like the
    teacher's inputs: the same images in every process (made once per process: an actor runs several trials)."""
    return kept(_MADE, (task.name, task.channels, task.image_size, n, seed), lambda: _generator_images(task, n, seed))


_MADE: dict[tuple, torch.Tensor] = {}  # the proxy images made in this process (trainable.tasks.kept)


def _generator_images(task: Task, n: int, seed: int) -> torch.Tensor:
    d = task.defaults
    latent = int(d.get("latent_dim", 100))
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        g = build_generator(d.get("generator", "dfad"), latent, int(d.get("generator_width", 64)), task.channels,
                            task.image_size).train()  # batch statistics (see the module docstring)
        for i in range(0, n, CHUNK):
            out.append(g(torch.randn(min(CHUNK, n - i), latent)).float())
    return torch.cat(out).contiguous()


def build_proxy(cfg, task, data, data_root: str | None = None) -> Proxy:
    """The proxy set of a run of ``cfg`` (see the module docstring). Raises UserError (an unreadable folder)."""
    spec = cfg.proxy
    if spec == "auto":
        if not data.labelled and min(len(data.val_x), len(data.test_x)) >= MIN_IMAGES // 2:
            return Proxy(data.val_x, data.test_x, f"the task's {len(data.val_x) + len(data.test_x)} unlabelled images")
        if cfg.prior.startswith("folder:"):
            spec = cfg.prior
        else:
            spec = "generator"
    if spec == "generator":
        return _halves(generator_images(task, 2 * cfg.proxy_images),
                       f"{2 * cfg.proxy_images} images of a frozen generator (seed {PROXY_SEED})")
    x = load_prior(spec, task, data_root)
    if len(x) < 2:
        raise UserError(f"proxy {spec}: fewer than 2 readable images; add images or use proxy: generator")
    return _halves(x, f"the {len(x)} images of {spec}")


@torch.no_grad()
def classes_of(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """The model's class (argmax) for every image, on the CPU; the model is put back in its mode."""
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def agreement(model: nn.Module, x: torch.Tensor, teacher_classes: torch.Tensor, device: torch.device,
              batch_size: int = 1024) -> float:
    """The share of ``x`` on which ``model``'s class is the teacher's."""
    if len(x) == 0:
        return float("nan")
    return float((classes_of(model, x, device, batch_size) == teacher_classes).float().mean())
