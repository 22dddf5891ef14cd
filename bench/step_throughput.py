"""Step throughput: synthetic images per second through full AKD iterations, project loop vs a straightforward one.

The straightforward loop is written the way the original DFAD code does it: teacher weights left
requiring grad (so its forward builds a graph in the student step, and its weight gradients are
computed in the generator step), the generator's output built with a graph and then detached for
the student step, student weight gradients computed during the generator step, fp32, contiguous
tensors. Same models, batch and step ratio; variants alternate A/B/... in one process, several
repeats; medians are printed, with the ratio against the straightforward loop.

Each row also gives the FLOPs of one full iteration (``FlopCounterMode``: forward and backward of
every step), the achieved FLOP/s, and its fraction of this machine's matmul peak in the variant's
precision (a square matmul of up to 2048 x 2048, timed the same way in the same run): how much speed is left
to win.
FLOPs are counted as a direct convolution does them; on a CPU, oneDNN's convolution kernels can need
fewer arithmetic operations than that, so the share can exceed 100% there.

Two rows measure the other methods at the project's default speed settings on the same models:
AVKD (conditional generator; each iteration also takes one discriminator step on generated and
prior images, counted as extra work, not as images) and DFAD with feature alignment (the teacher
runs unfolded so its layers can be hooked; the student matches its stage outputs).

Example::

    python bench/step_throughput.py                         # CIFAR-100 ResNet-34 -> ResNet-18 and digits
    python bench/step_throughput.py --shapes cifar100 --batch 32 --repeats 5
    python bench/step_throughput.py --shapes cifar100 --batch 256 --iters 20   # on a GPU
    python bench/step_throughput.py --shapes imagenet --repeats 3              # ResNet-50 -> MobileNetV3 at 224 px

The last line is ``ratio=<project default / straightforward, CIFAR-100 shapes>``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from trainable.akd import AKDRun, default_device
from trainable.config import build_config
from trainable.images import as_task_name
from trainable.measure import choose_speed
from trainable.models import build_classifier, build_generator
from trainable.speed import cpu_bf16_native, machine_description
from trainable.tasklist import TASKS
from trainable.tasks import EvalData, get_task

# Per shape: the task, models, batch and how many iterations one timed measurement runs.
_DIGITS = TASKS["digits"].defaults
SHAPES = {
    "cifar100": dict(task="cifar100", teacher="resnet34", student="resnet18", latent_dim=256, generator_width=64,
                     batch=32, iters=1),
    # the digits recipe's generator and batch, as the quick start runs them
    "digits": dict(task="digits", teacher="cnn", student="cnn", student_width=0.28125, latent_dim=64,
                   generator_width=_DIGITS["generator_width"], batch=_DIGITS["batch_size"], iters=10),
    # ImageNet-shaped (224 x 224, 1000 classes): Fast-Datafree's kind of pair, torchvision ResNet-50 -> MobileNetV3,
    # models named as a user names them; the task is a folder task made on the fly (one tiny image per class).
    "imagenet": dict(task="imagenet", teacher="torchvision:resnet50", student="torchvision:mobilenet_v3_small",
                     latent_dim=256, generator_width=64, batch=4, iters=1),
}


def imagenet_task(folder) -> str:
    """A folder task of 1000 classes at 224 x 224 (one 4 x 4 image per class: only its shape is used here)."""
    names = [f"c{i:04d}" for i in range(1000)]
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / name / "0.png")
    (folder / "task.yaml").write_text("image_size: 224\nchannels: 3\nmean: [0.485, 0.456, 0.406]\n"
                                      "std: [0.229, 0.224, 0.225]\n")
    return as_task_name(f"folder:{folder}")


class Straightforward:
    """DFAD's published loop (see the module docstring for what it wastes)."""

    def __init__(self, teacher, student, generator, batch: int, latent_dim: int, n_student: int, device):
        self.teacher, self.student, self.generator = teacher.eval(), student.train(), generator.train()
        self.batch, self.latent_dim, self.n_student, self.device = batch, latent_dim, n_student, device
        self.opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)

    def iteration(self) -> None:
        for _ in range(self.n_student):
            z = torch.randn(self.batch, self.latent_dim, device=self.device)
            self.opt_s.zero_grad()
            fake = self.generator(z).detach()
            t_logit = self.teacher(fake)
            s_logit = self.student(fake)
            loss_s = F.l1_loss(s_logit, t_logit.detach())
            loss_s.backward()
            self.opt_s.step()
        z = torch.randn(self.batch, self.latent_dim, device=self.device)
        self.opt_g.zero_grad()
        fake = self.generator(z)
        t_logit = self.teacher(fake)
        s_logit = self.student(fake)
        loss_g = -F.l1_loss(s_logit, t_logit)
        loss_g.backward()
        self.opt_g.step()


class Project:
    """The project's loop (``AKDRun``'s own steps) for one speed configuration."""

    def __init__(self, shape: dict, teacher, device, prior=None, speed=None, **values):
        self.run = AKDRun(project_config(shape, **values), teacher, empty_data(shape), device, prior=prior, speed=speed)

    def iteration(self) -> None:
        self.run.iteration()  # AVKD: its discriminator step is extra work per iteration, same images counted


def project_config(shape: dict, **values):
    return build_config({"task": shape["task"], "teacher": shape["teacher"], "student": shape["student"],
                         "student_width": shape.get("student_width", 1.0), "student_fraction": None,
                         "latent_dim": shape["latent_dim"], "generator_width": shape["generator_width"],
                         "batch_size": shape["batch"], "n_student": 5, "n_generator": 1, "w_bn": 0.0, **values})


def empty_data(shape: dict) -> EvalData:
    task = get_task(shape["task"])
    empty = torch.zeros(1, task.channels, task.image_size, task.image_size)
    return EvalData(empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(1, dtype=torch.long))


def auto_choice(shape: dict, device):
    """What ``precision: auto`` and ``channels_last: auto`` choose for this shape on this machine, measured
    afresh (a throwaway cache), as a run would the first time."""
    with tempfile.TemporaryDirectory() as d:
        return choose_speed(project_config(shape), build_models(shape, device)[0], empty_data(shape), device,
                            cache=Path(d) / "speed.json")


def build_models(shape: dict, device):
    task = get_task(shape["task"])
    torch.manual_seed(0)
    teacher = build_classifier(shape["teacher"], task.num_classes, task.channels, task.image_size).to(device)
    student = build_classifier(shape["student"], task.num_classes, task.channels, task.image_size,
                               shape.get("student_width", 1.0)).to(device)
    generator = build_generator("dfad", shape["latent_dim"], shape["generator_width"], task.channels,
                                task.image_size).to(device)
    return teacher, student, generator


def variants(shape: dict, device, auto) -> dict[str, object]:
    teacher, student, generator = build_models(shape, device)
    out = {"straightforward": Straightforward(teacher, student, generator, shape["batch"], shape["latent_dim"], 5,
                                              device)}
    t2 = build_models(shape, device)[0]  # the project freezes its own copy
    out["project fp32"] = Project(shape, t2, device, precision="fp32", channels_last=False)
    out["project fp32 channels_last"] = Project(shape, build_models(shape, device)[0], device, precision="fp32",
                                                channels_last=True)
    out["project bf16"] = Project(shape, build_models(shape, device)[0], device, precision="bf16",
                                  channels_last=False)
    out["project bf16 channels_last"] = Project(shape, build_models(shape, device)[0], device, precision="bf16",
                                                channels_last=True)
    out[f"project default (auto: {auto.name})"] = Project(shape, build_models(shape, device)[0], device, speed=auto)
    # The other methods at the default's speed settings, on the same models.
    t = get_task(shape["task"])
    n_prior = 512 if t.image_size <= 64 else 64
    prior = torch.randn(n_prior, t.channels, t.image_size, t.image_size)  # stands in for prior data: same cost
    out["project avkd (+ discriminator step)"] = Project(shape, build_models(shape, device)[0], device,
                                                         method="avkd", prior=prior, speed=auto)
    out["project dfad + feature alignment"] = Project(shape, build_models(shape, device)[0], device, w_feature=1.0,
                                                      speed=auto)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        compiled = Project(shape, build_models(shape, device)[0], device, precision="bf16", channels_last=True)
        compiled.run.student = torch.compile(compiled.run.student)
        compiled.run.teacher = torch.compile(compiled.run.teacher)
        compiled.run.generator = torch.compile(compiled.run.generator)
        out["project bf16 channels_last compile cudnn.benchmark"] = compiled
    return out


def measure(loop, iters: int, batch: int, device) -> float:
    """Images per second over ``iters`` iterations of 5 student + 1 generator steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        loop.iteration()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * 6 * batch / (time.perf_counter() - start)


def iteration_flops(loop) -> int:
    """Floating-point operations of one full iteration (forward and backward of every step), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        loop.iteration()
    return int(counter.get_total_flops())


def matmul_peak(device, dtype, n: int = 2048, repeats: int = 5, slow_s: float = 0.25) -> tuple[float, int]:
    """This machine's attainable FLOP/s in ``dtype``: a large square matmul, timed like the iterations (the best
    of the repeats: the attainable rate, not a typical one), and its side. The side grows from 256 to ``n`` while one
    matmul takes under ``slow_s``: where a dtype is only emulated (bf16 on a CPU without AVX-512 BF16 or AMX) a
    2048 x 2048 matmul takes tens of seconds, and a smaller one measures the same rate."""
    side = 256
    while True:
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b  # warm-up, and the size of one
        if device.type == "cuda":
            torch.cuda.synchronize()
        if side >= n or time.perf_counter() - t0 > slow_s:
            break
        side *= 2
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 3)
    return 2 * side ** 3 / min(times), side


def variant_dtype(loop) -> torch.dtype:
    run = getattr(loop, "run", None)
    return torch.bfloat16 if run is not None and run.precision == "bf16" else torch.float32


def bench_shape(name: str, shape: dict, repeats: int, device, peaks: dict) -> dict[str, float]:
    auto = auto_choice(shape, device)
    print(f"\n{name}: auto chooses {auto.name} ({auto.describe().split('(', 1)[1]}")
    loops = variants(shape, device, auto)
    for loop in loops.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice, compilation
        loop.iteration()
    flops = {k: iteration_flops(loop) for k, loop in loops.items()}
    samples = {k: [] for k in loops}
    for _ in range(repeats):  # alternate the variants inside each repeat: machine noise hits all alike
        for k, loop in loops.items():
            samples[k].append(measure(loop, shape["iters"], shape["batch"], device))
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["straightforward"]
    print(f"\n{name}: {shape['teacher']} -> {shape['student']}, batch {shape['batch']}, 5:1 steps, "
          f"{repeats} repeats x {shape['iters']} iterations, device {device}, {torch.get_num_threads()} threads")
    print(f"  {'variant':<52} {'img/s':>9}  {'range':>13}  {'ratio':>5}  {'GFLOP/iter':>10}  {'GFLOP/s':>8}  "
          "of matmul peak")
    for k, v in med.items():
        spread = f"{min(samples[k]):.0f}-{max(samples[k]):.0f}"
        achieved = flops[k] * v / (6 * shape["batch"])  # FLOP/s: FLOPs per iteration x iterations per second
        dtype = variant_dtype(loops[k])
        frac = achieved / peaks[dtype]
        print(f"  {k:<52} {v:>9.1f}  {spread:>13}  x{v / base:.2f}  {flops[k] / 1e9:>10.2f}  {achieved / 1e9:>8.1f}  "
              f"{100 * frac:5.1f}% ({'bf16' if dtype == torch.bfloat16 else 'fp32'})")
    return {("project default" if k.startswith("project default") else k): v / base for k, v in med.items()}


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="digits,cifar100", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batch", type=_positive, help="override the batch of every shape")
    p.add_argument("--iters", type=_positive, help="override the iterations of every timed measurement (on a GPU, one "
                                             "iteration at batch 256 lasts well under a second: use 20 or more)")
    p.add_argument("--repeats", type=_positive, default=5)
    p.add_argument("--device", default=str(default_device()))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(machine_description(device))
    measured = {dt: matmul_peak(device, dt) for dt in (torch.float32, torch.bfloat16)}
    peaks = {dt: peak for dt, (peak, _) in measured.items()}
    print("matmul peak (best of 5): " + ", ".join(
        f"{'bf16' if dt == torch.bfloat16 else 'fp32'} {p / 1e9:.1f} GFLOP/s ({side}x{side})"
        for dt, (p, side) in measured.items()))
    if device.type == "cpu":
        native = cpu_bf16_native()
        print("bf16 on this CPU: " + {True: "native (AVX-512 BF16 / AMX flags)", False: "emulated (no AVX-512 BF16 or "
              "AMX flag)", None: "unknown (no CPU flags readable)"}[native] + f"; bf16 matmul peak is "
              f"x{peaks[torch.bfloat16] / peaks[torch.float32]:.2f} fp32's")
    ratios = {}

    scratch = tempfile.TemporaryDirectory()
    for name in args.shapes.split(","):
        if name not in SHAPES:
            print(f"error: --shapes: unknown {name!r}; choose from {sorted(SHAPES)}", file=sys.stderr)
            return 2
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        if name == "imagenet":
            shape["task"] = imagenet_task(Path(scratch.name) / "imagenet")
        if args.batch:
            shape["batch"] = args.batch
        if args.iters:
            shape["iters"] = args.iters
        ratios[name] = bench_shape(name, shape, args.repeats, device, peaks)
    key = "cifar100" if "cifar100" in ratios else next(iter(ratios))
    print(f"\nproject default / straightforward ({key}): {ratios[key]['project default']:.2f}")
    print(f"ratio={ratios[key]['project default']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
