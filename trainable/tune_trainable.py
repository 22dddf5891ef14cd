"""The one module of trainable/ that imports Ray: an AKD run as a Ray Tune function trainable.

``tune.get_checkpoint()`` at the start (resume after interruption or a crash), then
``tune.report(metrics, checkpoint=...)`` once per epoch. The teacher and the evaluation data are
prepared once on the driver and shipped through the object store (``tune.with_parameters``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from base import metrics as M
from base.errors import NonFiniteLossError
from base.layout import CHECKPOINT_FILE
from base.storage import local_file
from trainable.akd import AKDRun, default_device
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import build_config
from trainable.models import build_classifier
from trainable.speed import Speed
from trainable.tasks import EvalData, Task, data_free


def teacher_payload(teacher: torch.nn.Module, arch: str) -> dict[str, Any]:
    """What trials receive of the teacher: its architecture name and CPU state_dict."""
    return {"arch": arch, "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()}}


def rebuild_teacher(payload: dict[str, Any], task: Task) -> torch.nn.Module:
    model = build_classifier(payload["arch"], task.num_classes, task.channels, task.image_size)
    model.load_state_dict(payload["state_dict"])
    return model


# Keys of a trial's config that are not AKDConfig fields: where a confirmation trial starts from.
CONTINUE_FROM = "continue_from"  # a checkpoint.pt to continue (same config), relative to the search folder; or absent
CANDIDATE = "candidate"  # the search trial a confirmation trial belongs to
RUN = "run"  # a confirmation trial's config is {RUN: {AKDConfig keys, CONTINUE_FROM, CANDIDATE}}


def akd_trial(config: dict[str, Any], teacher: dict[str, Any], data: EvalData, task: Task, threads: int = 1,
              data_root: str | None = None, speed: dict[str, Any] | None = None, search_dir: str = ".") -> None:
    """One Tune trial = one AKD run. ``config`` is a flat dict of ``AKDConfig`` keys; ``task`` the search's task,
    resolved once on the driver (a folder task's folder need not exist on a worker node); ``threads`` is the
    trial's CPUs (torch's intra-op threads, so trials side by side do not oversubscribe the cores);
    ``speed`` the precision and layout the search measured once on the driver (``Speed.record()``);
    ``search_dir`` the search folder where it is now (a confirmation trial's ``continue_from`` is relative to it).

    A run whose loss becomes NaN/Inf reports ``{diverged: 1, error: reason}`` once and ends: the
    divergence is a result of its settings, which a retry from its checkpoint would only repeat.
    """
    torch.set_num_threads(max(1, threads))
    chosen = Speed.from_record(speed) if speed else None
    config = dict(config.get(RUN, config))
    continue_from = config.pop(CONTINUE_FROM, None)
    config.pop(CANDIDATE, None)
    cfg = build_config(config, task=task)  # a bad combination raises: the trial is recorded as errored, with the reason
    with data_free():
        run = AKDRun(cfg, rebuild_teacher(teacher, task), data, default_device(), data_root=data_root,
                     speed=chosen)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                run.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE))
        elif continue_from:
            path, done = local_file(search_dir, continue_from)  # a search on a URI: downloaded here
            try:
                run.load_state_dict(load_checkpoint(path))
            finally:
                done()

        def on_epoch(metrics: dict[str, float], r: AKDRun) -> None:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(r, os.path.join(d, CHECKPOINT_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        try:
            run.fit(on_epoch)
        except NonFiniteLossError as e:
            tune.report({M.DIVERGED: 1.0, M.ERROR: str(e)[:500]})
