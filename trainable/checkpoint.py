"""A run's checkpoint: the format of ``checkpoint.pt`` (everything a resume needs, loadable with
``weights_only=True``), what may differ between the run that wrote it and the one that resumes it, and how it is
written (atomically) and read (one line where it is not ours). ``run`` is a ``trainable.akd.AKDRun``, which imports
this module (so this one names it only in words: one direction of import)."""
from __future__ import annotations

import os
import random
import warnings
from typing import Any

import torch

from base import metrics as M
from base.errors import CheckpointError
from base.files import torch_save
from trainable.config import FIELDS, METHOD_KEYS, config_to_dict

CHECKPOINT_FORMAT = "akdtune.run/1"
# Config keys that may differ between a checkpoint and the run resuming it: budgets, and the speed
# settings (a run moved to another machine resumes at that machine's fastest).
RESUMABLE_CHANGES = ("epochs", "early_stop_patience", "eval_batch_size", "precision", "channels_last", "deterministic")


def run_state(run: Any) -> dict[str, Any]:
    """One dict holding everything a resume of ``run`` needs (loadable with ``weights_only=True``)."""
    def sched(s):
        return None if s is None else s.state_dict()

    return {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(run.cfg),
        "teacher": {"arch": run.cfg.teacher, "params": run.teacher_params,
                    "fingerprint": run.teacher_fingerprint},
        "speed": run.speed.record(),
        "student_width": run.student_width,
        "student": run.student.state_dict(),
        "generator": run.generator.state_dict(),
        "opt_student": run.opt_student.state_dict(),
        "opt_generator": run.opt_generator.state_dict(),
        "sched_student": sched(run.sched_student),
        "sched_generator": sched(run.sched_generator),
        **({"discriminator": run.discriminator.state_dict(),
            "opt_discriminator": run.opt_discriminator.state_dict(),
            "sched_discriminator": sched(run.sched_discriminator)} if run.avkd else {}),
        **({"projector": run.projector.state_dict()} if run.projector is not None else {}),
        M.EPOCH: run.epoch,
        "best_selected": run.best_selected,
        "best_epoch": run.best_epoch,
        "history": list(run.history),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
    }


def restore_run(run: Any, ckpt: dict[str, Any]) -> None:
    """Restore ``run`` from a checkpoint of :func:`run_state`; everything that must match is checked first."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not an AKD run checkpoint (expected format {CHECKPOINT_FORMAT}); "
                              "pass a checkpoint.pt written by this tool")
    mine, theirs = config_to_dict(run.cfg), checkpoint_config(ckpt["config"], run.cfg.method)
    diff = sorted(k for k in mine if k not in RESUMABLE_CHANGES and k in theirs and mine[k] != theirs[k])
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (run has {mine[k]!r})" for k in diff[:5])
        raise CheckpointError(f"checkpoint was written with a different config: {shown}; "
                              "resume with the same settings or start a new run")
    if ckpt["teacher"]["fingerprint"] != run.teacher_fingerprint:
        raise CheckpointError("checkpoint was written with a different teacher "
                              f"({ckpt['teacher']['fingerprint']} vs {run.teacher_fingerprint}); "
                              "resume with the teacher it was trained against")
    run.student.load_state_dict(ckpt["student"])
    run.generator.load_state_dict(ckpt["generator"])
    run.opt_student.load_state_dict(ckpt["opt_student"])
    run.opt_generator.load_state_dict(ckpt["opt_generator"])
    for sched, key in ((run.sched_student, "sched_student"), (run.sched_generator, "sched_generator")):
        if sched is not None:
            sched.load_state_dict(ckpt[key])
    if run.avkd:
        run.discriminator.load_state_dict(ckpt["discriminator"])
        run.opt_discriminator.load_state_dict(ckpt["opt_discriminator"])
        if run.sched_discriminator is not None:
            run.sched_discriminator.load_state_dict(ckpt["sched_discriminator"])
    if run.projector is not None:
        run.projector.load_state_dict(ckpt["projector"])
    run.epoch = int(ckpt[M.EPOCH])
    run.best_selected = float(ckpt["best_selected"])
    run.best_epoch = int(ckpt["best_epoch"])
    run.history = list(ckpt["history"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    random.setstate(ckpt["rng"]["python"])


def checkpoint_config(saved: dict[str, Any], method: str) -> dict[str, Any]:
    """A checkpoint's config as this version reads it: a key it predates takes the value the run then had (the
    dataclass default: the feature did not exist), and AVKD-only keys are moot unless the method is AVKD."""
    out = {k: saved.get(k, f.default) for k, f in FIELDS.items()}
    out.update({k: v for k, v in saved.items() if k not in FIELDS})
    if method != "avkd" and out["method"] != "avkd":
        for k in METHOD_KEYS["avkd"]:
            out.pop(k, None)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def save_checkpoint(run: Any, path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    torch_save(run.state_dict(), path)


def load_checkpoint(path) -> dict[str, Any]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of a checkpoint.pt")
    try:
        with warnings.catch_warnings():  # our one line says what is wrong; torch's warnings would bury it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                              "it is corrupt or not written by this tool") from None
