"""One data-free adversarial distillation run, without Ray.

Example::

    python trainable/run_akd.py --task digits --out runs/one
    python trainable/run_akd.py --task digits --out runs/one --set student_fraction=0.05 --set student_loss=kl
    python trainable/run_akd.py --task cifar100 --teacher resnet34.pt --data-root data --out runs/c100
    python trainable/run_akd.py --task digits --out runs/one --resume   # continue from checkpoint.pt

Writes into ``--out``: config.json, metrics.jsonl (one line per epoch), checkpoint.pt (every epoch),
final.json, student.pt, generated.png, confusion_test.csv. Exit codes: 0 done, 2 bad input, 3 interrupted (Ctrl-C;
prints the --resume command), 1 other.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from base import metrics as M
from base.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, UserError, told_unwritable
from base.files import check_makeable, write_json, write_text
from base.layout import CHECKPOINT_FILE, RUN_EPOCHS, RUN_FINAL
from base.verdict import collapse_words, collapsed, verdict_line
from trainable.akd import AKDRun, default_device
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import METHODS, build_config, parse_value
from trainable.fitting import fit_task
from trainable.images import FOLDER, as_task_name, is_folder_task
from trainable.measure import choose_speed, expected_line, iteration_seconds
from trainable.outputs import finish_run, teacher_metrics, write_config
from trainable.sources import as_spec, check_student
from trainable.tasks import TASKS, data_free, load_eval_data
from trainable.teacher import prepare_teacher


def parse_sets(items: list[str]) -> dict:
    """``["lr_student=0.05", ...]`` -> typed dict; a malformed item is a UserError."""
    values = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        values[key.strip()] = parse_value(key.strip(), text)
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One data-free adversarial distillation run (no Ray).")
    p.add_argument("--task", default="digits", help=f"one of {sorted(TASKS)}, or folder:PATH of your own labelled images "
                   "(default digits)")
    p.add_argument("--out", help="output folder (default runs/<task>_<method>)")
    p.add_argument("--method", choices=sorted(METHODS), help="distillation method (default dfad; the same as "
                   "--set method=NAME)")
    p.add_argument("--prior", help="AVKD's prior data: letters | photos | cifar10 | cifar100 | cifar90 | "
                   "folder:PATH (default: the task's; the same as --set prior=...)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set lr_student=0.05")
    p.add_argument("--teacher", help="teacher checkpoint (state_dict); required except for digits and .pt2 programs")
    p.add_argument("--teacher-model", metavar="SPEC", help="the teacher's model: a registered name, torchvision:NAME, "
                   "timm:NAME, package.module:callable, or a torch.export program file (.pt2); the same as "
                   "--set teacher=SPEC")
    p.add_argument("--data-root", help="folder of the torchvision dataset")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (online)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--estimate", action="store_true", help="print how long the run will take on this machine (from the "
                   "speed measurement's timing) and exit without training or writing anything")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the output folder was chosen
        print("interrupted before the run started; run the same command again", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        code = told_unwritable(e, "pass an --out you can write to")
        if code is None:
            raise
        return code


def interrupted(out: Path, argv: list[str]) -> int:
    """Ctrl-C: one line, with the command that continues the run where its last checkpoint left it."""
    if not (out / CHECKPOINT_FILE).exists():
        print(f"interrupted before the first epoch was saved; nothing to resume in {out}: run the same command again",
              file=sys.stderr)
        return 1
    command = "python trainable/run_akd.py " + " ".join(shlex.quote(a) for a in argv if a != "--resume") + " --resume"
    print(f"interrupted; the run is saved at its last epoch. Resume with:  {command}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run(args: argparse.Namespace, argv: list[str]) -> int:
    start = time.time()
    if args.threads < 0:
        raise UserError(f"--threads {args.threads} is invalid: must be >= 1 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    shortcuts = {k: v for k, v in (("method", args.method), ("prior", args.prior),
                                   ("teacher", as_spec(args.teacher_model))) if v is not None}
    values = {"task": as_task_name(args.task), **shortcuts, **parse_sets(args.sets)}
    cfg = build_config(values)
    task = cfg.task_spec  # resolved once, by build_config
    for note in task.notes:
        print(f"note: {note}")
    short = Path(cfg.task[len(FOLDER):]).name if is_folder_task(cfg.task) else cfg.task
    out = Path(args.out or f"runs/{short}_{cfg.method}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run's outputs")
    if not os.access(out if out.exists() else next(p for p in out.absolute().parents if p.exists()), os.W_OK):
        raise UserError(f"--out {out} is not writable; pass a folder you can write to")
    ckpt_path = out / CHECKPOINT_FILE
    if args.resume and not ckpt_path.exists():
        raise UserError(f"nothing to resume: {ckpt_path} does not exist; run without --resume")
    if not args.resume and not args.estimate and (ckpt_path.exists() or (out / RUN_FINAL).exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    check_makeable(out, "--out")  # a folder that cannot be made (/proc/x, a name too long): one line before any work
    try:
        return _run(args, values, cfg, task, out, start)
    except KeyboardInterrupt:
        return interrupted(out, argv)


def _run(args: argparse.Namespace, values: dict, cfg, task, out: Path, start: float) -> int:
    """The run itself, once its settings and output folder are checked: the door checks, the recipe fitted to the
    teacher, then the epochs."""
    ckpt_path = out / CHECKPOINT_FILE
    teacher, teacher_info = prepare_teacher(task, cfg.teacher, args.teacher, cfg.seed, args.data_root,
                                            batch_size=cfg.batch_size)
    fitted = fit_task(task, teacher, teacher_info["arch"])
    print(fitted.line)
    task = fitted.task
    cfg = build_config(values, task=task)  # the settings given, over the recipe fitted to this teacher
    check_student(cfg.student, task.num_classes, task.channels, task.image_size, cfg.batch_size)  # a foreign one
    with data_free():  # from here on, the teacher's training data cannot be read
        data = load_eval_data(task, cfg.seed, cfg.val_fraction, args.data_root, args.download)
        device = default_device()
        speed = choose_speed(cfg, teacher, data, device, data_root=args.data_root)  # cached after the first time
        print(speed.describe(), flush=True)
        akd = AKDRun(cfg, teacher, data, device, data_root=args.data_root, speed=speed)
        for note in akd.notes:
            print(f"note: {note}")
        if args.resume:
            akd.load_state_dict(load_checkpoint(ckpt_path))
            print(f"resumed at epoch {akd.epoch}/{cfg.epochs}")
        print(expected_line(cfg, cfg.epochs - akd.epoch, iteration_seconds(cfg, teacher, data, device, speed,
                                                                           args.data_root)), flush=True)
        if args.estimate:
            return 0
        out.mkdir(parents=True, exist_ok=True)
        write_config(akd, out)
        t_acc = teacher_metrics(akd.teacher, akd.data, akd.device)
        t_val = "no labels" if t_acc[M.TEACHER_VAL_ACC] is None else f"val {t_acc[M.TEACHER_VAL_ACC]:.4f}"
        if akd.proxy is not None:
            print(f"selecting on agreement with the teacher (val_agreement) on {akd.proxy.source}"
                  + ("; no accuracy is measured (the task has no labels)" if not data.labelled else ""))
        print(f"task {cfg.task}: teacher {teacher_info['arch']} {akd.teacher_params:,} params "
              f"({t_val}); student {cfg.student} width {akd.student_width:g} "
              f"{akd.student_params:,} params ({akd.student_params / akd.teacher_params:.1%}); device {akd.device}")

        bar, on_epoch = _epoch_output(cfg, akd, out, ckpt_path)
        akd.fit(on_epoch)
        if bar is not None:
            bar.close()
        final = finish_run(akd, out, t_acc, time.time() - start)
    write_json(out / RUN_FINAL, final)
    print("final: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items()
                                if v is not None and k not in M.VERDICT_KEYS))
    line = verdict_line(final, "the teacher's held-out accuracy" if final.get(M.TEST_ACC) is not None
                        else "agreement with the teacher on held-out images")
    if line:
        print(line)
    return 0


def _epoch_output(cfg, akd: AKDRun, out: Path, ckpt_path: Path):
    """(the progress bar or None, what each epoch does): its checkpoint and metrics.jsonl, and a bar with the
    epoch, losses and ETA in a terminal, one line per epoch in logs and pipes."""
    bar = None
    if sys.stdout.isatty():
        bar = tqdm(total=cfg.epochs, initial=akd.epoch, unit="epoch", dynamic_ncols=True)

    def on_epoch(m: dict, r: AKDRun) -> None:
        save_checkpoint(r, ckpt_path)
        # metrics.jsonl mirrors the checkpoint's history, so a resume never duplicates lines.
        write_text(out / RUN_EPOCHS, "".join(json.dumps(h) + "\n" for h in r.history))
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.4f}" for k in (M.VAL_ACC, M.VAL_AGREEMENT, M.LOSS_STUDENT,
                                                          M.LOSS_GENERATOR) if k in m})
            return
        loss_d = f"  loss_D {m[M.LOSS_DISCRIMINATOR]:.4f}" if M.LOSS_DISCRIMINATOR in m else ""
        spread = m.get(M.GEN_CLASSES)
        loss_d += (f"  {collapse_words(spread, akd.task.num_classes)}" if collapsed(spread, akd.task.num_classes)
                   else f"  classes {spread:.1f}")
        val = "".join(f"  {k} {m[k]:.4f}" for k in (M.VAL_ACC, M.VAL_AGREEMENT, M.VAL_LOSS) if k in m)
        print(f"epoch {m['epoch']:>4}/{cfg.epochs}{val}  "
              f"loss_S {m['loss_student']:.4f}  loss_G {m['loss_generator']:.4f}{loss_d}  "
              f"{m['images_per_s']:.0f} img/s", flush=True)

    return bar, on_epoch


if __name__ == "__main__":
    sys.exit(main())
