"""Train a teacher on a task's training data, for users who have the data (and, for CIFAR, a GPU).

Standard CIFAR recipe by default: SGD 0.1, momentum 0.9, weight decay 5e-4, 200 epochs, crop+flip.

Example::

    python trainable/train_teacher.py --task cifar100 --data-root data --out resnet34_cifar100.pt
    python search/run_search.py --space spaces/capacity.yaml --task cifar100 --teacher resnet34_cifar100.pt

Writes a plain state_dict (loadable with ``weights_only=True``) and prints validation and test
accuracy on the task's evaluation splits. Exit codes: 0 done, 2 bad input, 1 other.
"""
from __future__ import annotations

import argparse
import os
import sys

from base import metrics as M
from base.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UserError, unknown
from base.files import torch_save
from trainable.models import CLASSIFIERS
from trainable.tasks import TASKS, get_task
from trainable.teacher import teacher_accuracy, train_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a teacher on a task's training split.")
    p.add_argument("--task", required=True, help=f"one of {sorted(TASKS)}")
    p.add_argument("--arch", help=f"one of {sorted(CLASSIFIERS)} (default: the task's teacher)")
    p.add_argument("--out", required=True, help="where to write the state_dict (.pt)")
    p.add_argument("--data-root", help="folder of the torchvision dataset")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        task = get_task(args.task)
        arch = args.arch or task.teacher
        if arch not in CLASSIFIERS:
            raise UserError(unknown(f"unknown arch {arch!r}", sorted(CLASSIFIERS)))
        if args.epochs < 1 or args.lr <= 0 or args.batch_size < 1:
            raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if os.path.isdir(args.out) or args.out.endswith(os.sep):
            raise UserError(f"--out {args.out} is a folder; pass a file path such as {os.path.join(args.out, 'teacher.pt')}")
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise UserError(f"--out {args.out}: {parent} is a file, not a folder; pass another path")
        model = train_teacher(task, arch, args.seed, args.epochs, args.lr, args.batch_size,
                              args.weight_decay, args.data_root, progress=True)
        model = model.cpu()
        torch_save(model.state_dict(), args.out)
        acc = teacher_accuracy(model, task, args.seed, args.data_root)
        print(f"teacher {arch} on {task.name}: val_acc {acc[M.TEACHER_VAL_ACC]:.4f} test_acc {acc[M.TEACHER_TEST_ACC]:.4f}; "
              f"saved {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"interrupted; no teacher was saved (nothing is written to {args.out} until training ends): run the "
              "same command again", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
