"""A teacher without BatchNorm, distilled by the default command: the student's share of its teacher's accuracy.

The user's side, done here as a user does it outside this tool: a LeNet-5 teacher of their own (DFAD's MNIST
architecture: conv-relu-pool x2, conv, two linear layers; **no BatchNorm**) in their own module
(``mynets.py``), trained with plain PyTorch on a 32 px rendering of the digits' teacher-train split (each 8 x 8
digit drawn at 28 x 28 with a 2 px zero border, as MNIST is), saved as a state_dict; its held-out images (the
digits' validation and test images, never the teacher's) as PNG files in ImageFolder layout with a
``task.yaml`` giving the teacher's mean and std. Then the default command, unchanged, from the user's folder::

    python search/run_search.py --space spaces/capacity.yaml --task folder:imgs \\
        --teacher-model mynets:LeNet5 --teacher teacher.pt

``--teacher-form pt2`` gives the same teacher as a ``torch.export`` program (``teacher.pt2``, no code);
``--teacher-form bn-pt2`` a BatchNorm CNN (the same LeNet-5 with BatchNorm after each convolution) as a program,
and ``bn-code`` that CNN as code, to compare the two forms of one BatchNorm teacher.

It prints the teacher's held-out accuracy, the confirmed winner's, their ratio (the field's bar: DFAD reaches
0.994 of its teacher on MNIST LeNet-5 -> LeNet-5-half, DAFL 0.993) and the whole command's wall time.

Example::

    python bench/bnfree_teacher.py                          # the default search, about 10 minutes on 2 CPU cores
    python bench/bnfree_teacher.py --teacher-form pt2       # the same teacher as a .pt2 program
    python bench/bnfree_teacher.py --smoke                  # the pipeline at smoke size
    python bench/bnfree_teacher.py --keep work --user-side-only   # only write the user's folder (then run by hand)

The last line is ``ratio=<winner test_acc / teacher test_acc>``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from own_teacher import fit_users_teacher, run_user_search  # bench/: run as a script, its folder is on the path
from PIL import Image
from sklearn.datasets import load_digits

from trainable.tasks import _digits_split

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("code", "pt2", "bn-code", "bn-pt2")

USER_MODULE = '''
import torch.nn as nn


class LeNet5(nn.Module):
    """DFAD's MNIST teacher: 32 x 32 grey images, ReLU, max-pool, no BatchNorm."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 120, 5), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class LeNet5BN(nn.Module):
    """The same LeNet-5 with BatchNorm after each convolution."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 120, 5), nn.BatchNorm2d(120), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
'''
SIDE, DRAWN = 32, 28  # the images' side, and the digit's inside a zero border (MNIST's layout)
MEAN, STD = 0.1, 0.3  # the teacher's input normalisation, written in task.yaml as a user would


def render(images: np.ndarray) -> np.ndarray:
    """8 x 8 digits (values 0-16) drawn at 28 x 28 inside a 2 px zero border: (N, 32, 32) in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(DRAWN, DRAWN), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (SIDE - DRAWN) // 2
    return F.pad(x, (pad, pad, pad, pad))[:, 0].numpy()


def user_side(work: Path, seed: int, form: str = "code") -> tuple[float, list[str]]:
    """Train the user's teacher on teacher-train and write the held-out images; returns the teacher's held-out
    accuracy and the command-line arguments naming the teacher."""
    (work / "mynets.py").write_text(USER_MODULE)
    sys.path.insert(0, str(work))
    import mynets  # noqa: PLC0415 - the user's module, written into the work folder just above

    d = load_digits()
    split = _digits_split(seed)
    norm = lambda idx: (torch.from_numpy(render(d.images[idx])).unsqueeze(1) - MEAN) / STD  # noqa: E731
    x, y = norm(split["teacher_train"]), torch.from_numpy(d.target[split["teacher_train"]])
    torch.manual_seed(seed)
    cls = "LeNet5BN" if form.startswith("bn") else "LeNet5"
    model = getattr(mynets, cls)(10)
    fit_users_teacher(model, x, y, torch.optim.Adam(model.parameters(), lr=1e-3), 40)
    torch.save(model.state_dict(), work / "teacher.pt")
    held = np.concatenate([split["val"], split["test"]])
    pixels = (render(d.images[held]) * 255).round().astype(np.uint8)
    for n, i in enumerate(held):  # the held-out images as a user has them: PNG files, a folder per class
        folder = work / "imgs" / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[n], "L").save(folder / f"{n}.png")
    (work / "imgs" / "task.yaml").write_text(yaml.safe_dump({"classes": [str(c) for c in range(10)], "mean": [MEAN],
                                                             "std": [STD], "image_size": SIDE, "channels": 1}))
    if form.endswith("pt2"):
        program = torch.export.export(model, (torch.zeros(2, 1, SIDE, SIDE),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        torch.export.save(program, str(work / "teacher.pt2"))
        teacher_args = ["--teacher-model", "teacher.pt2"]
    else:
        teacher_args = ["--teacher-model", f"mynets:{cls}", "--teacher", "teacher.pt"]
    with torch.no_grad():
        held_x = torch.from_numpy(pixels.astype(np.float32) / 255).unsqueeze(1)
        acc = float((model((held_x - MEAN) / STD).argmax(1) == torch.from_numpy(d.target[held])).float().mean())
    return acc, teacher_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the teacher's and the search's seed")
    p.add_argument("--teacher-form", choices=FORMS, default="code",
                   help="the BatchNorm-free LeNet-5 as code or as a .pt2 program, or a BatchNorm LeNet-5 (bn-*)")
    p.add_argument("--space", default=str(ROOT / "spaces" / "capacity.yaml"), help="the space (default: the default's)")
    p.add_argument("--smoke", action="store_true", help="the search at smoke size")
    p.add_argument("--keep", help="keep the user's folder here (default: a temporary folder)")
    p.add_argument("--user-side-only", action="store_true", help="write the user's folder and stop")
    p.add_argument("--address", help="passed to the search: join this running Ray cluster")
    args = p.parse_args(argv)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    work = Path(args.keep or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher_acc, teacher_args = user_side(work, args.seed, args.teacher_form)
    print(f"teacher ({args.teacher_form}): held-out accuracy {teacher_acc:.4f} on {work / 'imgs'}", flush=True)
    if args.user_side_only:
        return 0
    cmd = [sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(Path(args.space).resolve()),
           "--task", "folder:imgs", *teacher_args, "--seed", str(args.seed), "--storage", "runs", "--name", "bnfree",
           *(["--smoke"] if args.smoke else []), *(["--address", args.address] if args.address else [])]
    r, wall = run_user_search(cmd, work, lines=30)
    if r.returncode != 0:
        return r.returncode
    best = json.loads((work / "runs" / "bnfree" / "best" / "metrics.json").read_text())
    print(f"\nwinner: {best['student_params']:,} params ({best['param_ratio']:.1%} of the teacher's "
          f"{best['teacher_params']:,}), test_acc {best['test_acc']:.4f} ± {best['test_acc_std']:.4f} over seeds "
          f"{best['seeds']}; teacher test_acc {best['teacher_test_acc']:.4f}; command {wall:.0f} s")
    print(f"ratio={best['test_acc'] / best['teacher_test_acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
