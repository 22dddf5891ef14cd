"""GPU packing: trials per hour on one GPU at --gpus-per-trial 1, 0.5 and 0.25 (CIFAR-100 shapes).

Runs only when CUDA is present (prints that it was skipped otherwise). The data and the teacher
are random stand-ins in the real formats (a ``cifar-100-python`` test file, a ResNet-34
state_dict): throughput does not depend on what the pixels show.

Example::

    python bench/gpu_packing.py --trials 8

The last line is ``ratio=<trials per hour at 0.25 / at 1>`` (``ratio=nan`` when skipped).
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trainable.models import build_classifier

ROOT = Path(__file__).resolve().parents[1]


def write_standins(root: Path) -> tuple[Path, Path]:
    """A random CIFAR-100 test split in torchvision's on-disk format, and a random ResNet-34 teacher."""
    folder = root / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 2000
    for name in ("test", "train"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": (np.arange(n) % 100).tolist(), "coarse_labels": [0] * n,
                         "filenames": [""] * n, "batch_label": name}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": ["0"] * 20}, f)
    teacher = root / "teacher.pt"
    torch.save(build_classifier("resnet34", 100, 3, 32).state_dict(), teacher)
    # The stand-in files are not the official bytes: skip torchvision's md5 check in every process.
    shim = root / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import os, torchvision.datasets.cifar as c\n"
                                           "c.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)\n")
    return root / "data", teacher


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device on this machine")
        print("ratio=nan")
        return 0
    space = {"objective": {"metric": "val_acc", "mode": "max"},
             "budget": {"num_samples": args.trials, "max_epochs": args.epochs, "grace_period": args.epochs,
                        "confirm_top_k": 0},
             "fixed": {"iters_per_epoch": 20, "batch_size": 256, "precision": "bf16", "channels_last": True},
             "params": {"lr_student": {"type": "float", "low": 0.05, "high": 0.2, "log": True}}}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, teacher = write_standins(tmp)
        (tmp / "space.yaml").write_text(yaml.safe_dump(space))
        env = dict(os.environ, PYTHONPATH=f"{tmp / 'shim'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        for share in (1.0, 0.5, 0.25):
            start = time.perf_counter()
            r = subprocess.run([sys.executable, "search/run_search.py", "--space", str(tmp / "space.yaml"),
                                "--task", "cifar100", "--teacher", str(teacher), "--data-root", str(data),
                                "--storage", str(tmp / "runs"), "--name", f"share{share}", "--no-report",
                                "--gpus-per-trial", str(share), "--cpus-per-trial", "2", "--no-early-stopping"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if r.returncode != 0:
                sys.exit(f"search at gpus-per-trial {share} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            rates[share] = args.trials / wall * 3600
            print(f"  gpus-per-trial {share:<5} {args.trials} trials in {wall:6.1f} s  -> {rates[share]:7.1f} trials/hour",
                  flush=True)
    print(f"{torch.cuda.get_device_name()}: packing 4 trials per GPU gives x{rates[0.25] / rates[1.0]:.2f} trials/hour")
    print(f"ratio={rates[0.25] / rates[1.0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
