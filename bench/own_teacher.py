"""Your own teacher class, your own folder of images: the capacity search end to end, as a user would run it.

The user's side, done here the way a user does it outside this tool: a teacher class in their own
module (``mynets.py``), trained with plain PyTorch on the digits' teacher-train split and saved as a
state_dict; their held-out labelled images (the digits' validation and test images, never the
teacher's) written as PNG files in ImageFolder layout with a ``task.yaml`` giving the teacher's
normalisation; and a copy of ``spaces/capacity.yaml`` with the digits recipe written in ``fixed`` (a
folder task's defaults are sized for larger images). Then the real command::

    python search/run_search.py --space capacity_own.yaml --task folder:imgs \\
        --teacher-model mynets:DigitsNet --teacher teacher.pt

run from the user's folder. It prints the teacher's and the confirmed winner's held-out accuracy,
the winner's size, the refused settings over the budget and the wall time.

Example::

    python bench/own_teacher.py                 # about 5 minutes on 2 CPU cores
    python bench/own_teacher.py --smoke         # the pipeline at smoke size

The last line is ``ratio=<winner test_acc / teacher test_acc>``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from trainable.tasks import _digits_split

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = '''
import torch.nn as nn


class DigitsNet(nn.Module):
    """A user's own teacher for 8 x 8 grey images."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))
'''
# The digits recipe (trainable/tasks.py), written in the space as a user with their own folder would.
DIGITS_RECIPE = dict(student="cnn", generator="dfad", latent_dim=64, generator_width=32, iters_per_epoch=20,
                     batch_size=128, n_student=5, n_generator=1, scheduler="cosine", w_bn=0.1)


def fit_users_teacher(model, x, y, opt, epochs: int, batch: int = 64) -> None:
    """The user's own training loop, outside the tool: shuffled mini-batches of cross-entropy for ``epochs`` epochs;
    the model is left in eval mode."""
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            b = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()


def user_side(work: Path, seed: int) -> float:
    """Train the user's teacher on teacher-train, write the held-out images; returns the teacher's held-out acc."""
    (work / "mynets.py").write_text(USER_MODULE)
    sys.path.insert(0, str(work))
    import mynets  # noqa: PLC0415 - the user's module, written into the work folder just above

    d = load_digits()
    split = _digits_split(seed)
    norm = lambda idx: (torch.from_numpy(d.images[idx].astype(np.float32) / 16.0).unsqueeze(1) - 0.5) / 0.5  # noqa: E731
    x, y = norm(split["teacher_train"]), torch.from_numpy(d.target[split["teacher_train"]])
    torch.manual_seed(seed)
    model = mynets.DigitsNet(10)
    fit_users_teacher(model, x, y, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), 60)
    torch.save(model.state_dict(), work / "teacher.pt")
    held = np.concatenate([split["val"], split["test"]])
    for n, i in enumerate(held):  # the held-out images as a user has them: PNG files, a folder per class
        folder = work / "imgs" / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{n}.png")
    (work / "imgs" / "task.yaml").write_text(yaml.safe_dump({"classes": [str(c) for c in range(10)],
                                                             "mean": [0.5], "std": [0.5], "image_size": 8,
                                                             "channels": 1}))
    with torch.no_grad():
        return float((model(norm(held)).argmax(1) == torch.from_numpy(d.target[held])).float().mean())


def run_user_search(cmd: list[str], work: Path, lines: int = 24) -> tuple[subprocess.CompletedProcess, float]:
    """The search command as a user runs it from their own folder (the project on PYTHONPATH): it is printed, then
    the last ``lines`` of its summary (not the per-trial lines), and its stderr where it failed. Returns the finished
    process and the command's wall seconds."""
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=True)
    wall = time.time() - start
    tail = [ln for ln in r.stdout.splitlines() if not ln.startswith(("[", " "))]
    print("\n".join(tail[-lines:]))
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return r, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the search at smoke size")
    p.add_argument("--keep", help="keep the user's folder here (default: a temporary folder)")
    args = p.parse_args(argv)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    work = Path(args.keep or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher_acc = user_side(work, args.seed)
    space = yaml.safe_load((ROOT / "spaces" / "capacity.yaml").read_text())
    searched = set(space.get("params") or {})
    space["fixed"] = {**(space.get("fixed") or {}), **{k: v for k, v in DIGITS_RECIPE.items() if k not in searched}}
    (work / "capacity_own.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, str(ROOT / "search" / "run_search.py"), "--space", "capacity_own.yaml", "--task",
           "folder:imgs", "--teacher-model", "mynets:DigitsNet", "--teacher", "teacher.pt", "--seed", str(args.seed),
           "--storage", "runs", *(["--smoke"] if args.smoke else [])]
    r, wall = run_user_search(cmd, work)
    if r.returncode != 0:
        return r.returncode
    exp = work / "runs" / "capacity_own"
    best = json.loads((exp / "best" / "metrics.json").read_text())
    print(f"\nteacher (the user's DigitsNet, {best['teacher_params']:,} params): held-out accuracy {teacher_acc:.4f} "
          f"(the tool measured test {best['teacher_test_acc']:.4f} on its split of the folder)")
    print(f"winner: {best['student_params']:,} params ({best['param_ratio']:.1%}), test_acc {best['test_acc']:.4f} ± "
          f"{best['test_acc_std']:.4f} over seeds {best['seeds']}; report {exp / 'report.html'}; command {wall:.0f} s")
    print(f"ratio={best['test_acc'] / best['teacher_test_acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
