"""What a finished run leaves behind: final metrics, student weights, an image grid, a confusion matrix.

Used by the single-run CLI (``final.json``) and by the search for its best trial (``best/metrics.json``);
both carry the keys of ``base.metrics.FINAL_METRICS``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import statistics
import sys
import time
from pathlib import Path

import torch

from base import metrics as M
from base.files import atomic_path, torch_save, write_json, write_text
from base.layout import CONFUSION_TABLE, GENERATED_GRID, RUN_CONFIG, STUDENT_ONNX, STUDENT_PROGRAM, STUDENT_WEIGHTS
from base.verdict import judge
from trainable.akd import AKDRun
from trainable.config import config_to_dict
from trainable.evaluation import evaluate
from trainable.programs import read_program
from trainable.tasks import EvalData


def teacher_metrics(teacher: torch.nn.Module, data: EvalData, device: torch.device | None = None) -> dict[str, float]:
    """The teacher's validation and test accuracy, under the keys of ``final.json`` (None without labels)."""
    if not data.labelled:
        return {M.TEACHER_VAL_ACC: None, M.TEACHER_TEST_ACC: None}
    return {M.TEACHER_VAL_ACC: evaluate(teacher, data.val_x, data.val_y, device=device)["acc"],
            M.TEACHER_TEST_ACC: evaluate(teacher, data.test_x, data.test_y, device=device)["acc"]}


def save_image_grid(run: AKDRun, path: Path, n: int = 64, seed: int = 0) -> None:
    """A grid of generated images (torchvision's make_grid), de-normalised to the task's pixel range.

    A class-conditional generator (AVKD) gets one row per class, in class order, so a reader can see
    whether it learned the classes.
    """
    from torchvision.utils import make_grid, save_image  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

    g = torch.Generator(device="cpu").manual_seed(seed)
    k = run.task.num_classes
    per_row = 8 if not run.avkd else (10 if k <= 10 else 8)
    rows = n // per_row if not run.avkd else k
    z = torch.randn(rows * per_row, run.cfg.latent_dim, generator=g).to(run.device)
    was_training = run.generator.training
    run.generator.eval()
    with torch.no_grad():
        if run.avkd:
            y = torch.arange(k, device=run.device).repeat_interleave(per_row)  # row r: class r
            imgs = run.generator(z, y).float().cpu()  # (k * per_row, C, H, W), normalised
        else:
            imgs = run.generator(z).float().cpu()
    run.generator.train(was_training)
    mean = torch.tensor(run.task.mean).view(1, -1, 1, 1)
    std = torch.tensor(run.task.std).view(1, -1, 1, 1)
    imgs = (imgs * std + mean).clamp(0, 1)
    scale = max(1, 64 // run.task.image_size)  # enlarge 8x8 digits so they can be seen
    if scale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    with atomic_path(path) as tmp:
        save_image(make_grid(imgs, nrow=per_row, padding=2, pad_value=1.0), str(tmp), format="png")


def export_student(student: torch.nn.Module, channels: int, image_size: int, out: Path) -> None:
    """The student as a ``torch.export`` program, ``student.pt2`` (loadable with ``torch.export.load`` and no
    project code; any batch size), and ``student.onnx`` where the ONNX exporter (``onnx`` and ``onnxscript``,
    ``pip install -e .[onnx]``) is installed: one file, weights inside, any batch size. An ONNX export that
    fails leaves no file and says so in one line on stderr."""
    model = copy.deepcopy(student).float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(2, channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_path(out / STUDENT_PROGRAM) as tmp:
        with open(tmp, "wb") as f:  # the archive inside named "archive", the same bytes whichever process writes it
            torch.export.save(program, f)
        read_program(tmp)  # read back as any user of it will: passes the checks a .pt2 teacher passes
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        try:  # one self-contained file (weights inside, not beside it), and no exporter chatter on stdout
            with contextlib.redirect_stdout(io.StringIO()), atomic_path(out / STUDENT_ONNX) as tmp:
                torch.onnx.export(model, (x,), str(tmp), dynamo=True, dynamic_shapes=({0: batch},),
                                  external_data=False, verbose=False)
        except Exception as exc:  # optional: the .pt2 program is the export
            print(f"note: student.onnx not written ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                  "student.pt2 is the export", file=sys.stderr)


def inference_cost(student: torch.nn.Module, channels: int, image_size: int, flops: int, size_bytes: int,
                   latency_repeats: int = 30, throughput_repeats: int = 3) -> dict[str, float]:
    """What the student costs on this machine's CPU: latency at batch 1 and throughput at batch 256 (medians of
    timed runs after a warm-up, fp32), its FLOPs per image and its size on disk."""
    model = copy.deepcopy(student).float().cpu().eval()
    one = torch.randn(1, channels, image_size, image_size)
    many = torch.randn(256, channels, image_size, image_size)
    with torch.inference_mode():
        model(one)
        model(many)  # warm-up: allocator and kernel choice
        lat = []
        for _ in range(latency_repeats):
            t0 = time.perf_counter()
            model(one)
            lat.append(time.perf_counter() - t0)
        thr = []
        for _ in range(throughput_repeats):
            t0 = time.perf_counter()
            model(many)
            thr.append(256 / (time.perf_counter() - t0))
    return {M.FLOPS: int(flops), M.LATENCY_MS: 1000 * statistics.median(lat), M.THROUGHPUT: statistics.median(thr),
            M.SIZE_BYTES: int(size_bytes), M.THREADS: torch.get_num_threads()}


def finish_run(run: AKDRun, out: Path, teacher_acc: dict[str, float], wall_s: float) -> dict[str, float]:
    """Evaluate the student once on the held-out test split and write the run's outputs into ``out``.

    Writes ``final.json`` style metrics (returned, with the student's inference cost), ``student.pt``
    (state_dict), ``student.pt2`` (``torch.export`` program; ``student.onnx`` where the exporter is
    installed), ``generated.png``, ``confusion_test.csv`` (rows: true class, columns: predicted; labelled tasks) and
    ``config.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    val, test = run.measure("val"), run.measure("test", confusion=True)
    final = {
        M.VAL_ACC: val.get(M.VAL_ACC),  # None: the task has no labels
        M.TEST_ACC: test.get(M.TEST_ACC),
        M.VAL_AGREEMENT: val.get(M.VAL_AGREEMENT),  # None: selected on accuracy
        M.TEST_AGREEMENT: test.get(M.TEST_AGREEMENT),
        M.SELECTED_ON: run.selection,
        M.PROXY: run.proxy.source if run.proxy is not None else None,
        **teacher_acc,
        M.STUDENT_PARAMS: run.student_params,
        M.TEACHER_PARAMS: run.teacher_params,
        M.PARAM_RATIO: run.student_params / run.teacher_params,
        M.WALL_S: wall_s,
        M.PRECISION: run.precision,
        M.CHANNELS_LAST: run.channels_last,
        M.SPEEDUP: run.speed.speedup,
    }
    torch_save(run.student.state_dict(), out / STUDENT_WEIGHTS)
    t = run.task
    export_student(run.student, t.channels, t.image_size, out)
    final.update(inference_cost(run.student, t.channels, t.image_size, run.student_flops,
                                (out / STUDENT_PROGRAM).stat().st_size))
    final.update(judge(final, run.history, t.num_classes, config_to_dict(run.cfg)))
    save_image_grid(run, out / GENERATED_GRID)
    if "confusion" in test:  # a task without labels has none
        conf = test["confusion"]
        lines = ["true\\pred," + ",".join(str(i) for i in range(conf.shape[1]))]
        lines += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(conf.tolist())]
        write_text(out / CONFUSION_TABLE, "\n".join(lines) + "\n")
    write_config(run, out)
    return final


def write_config(run: AKDRun, out: Path) -> None:
    """``config.json``: the run's config as it ran (a recipe term dropped for its teacher included) and the student's
    resolved width; the one writer of the file."""
    write_json(out / RUN_CONFIG, {**config_to_dict(run.cfg), "resolved_student_width": run.student_width})
