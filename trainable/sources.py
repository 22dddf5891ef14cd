"""Models by name or import path: torchvision, timm, the user's own factory, or an exported program.

A model spec is what the config keys ``teacher`` and ``student`` (and ``--teacher-model``) hold:

- a registered name (``resnet34``, ``cnn``, ...: ``trainable.models.CLASSIFIERS``);
- ``torchvision:NAME``: any torchvision classification builder (``resnet50``, ``mobilenet_v3_small``,
  ``efficientnet_b0``, ``convnext_tiny``, ``vit_b_16``, ...), built untrained with the task's class count;
- ``timm:NAME``: any timm model (``pip install timm``), untrained, with the task's classes and channels;
- ``package.module:callable``: the user's own factory, called with ``num_classes=`` (this imports and
  runs the user's code); the current folder is importable, like ``python -m`` makes it;
- a ``torch.export`` program file (``*.pt2``), teacher only: the program carries its weights, so no
  code and no ``--teacher`` are needed.

Weights for the first four come from ``--teacher PATH`` (a state_dict read with ``weights_only=True``).
Every error is a ``UserError`` of one line that says what is wrong and what to do.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn as nn

from base.errors import UserError, unknown
from trainable.losses import tap_batch_norms
from trainable.programs import ProgramError, load_module

TORCHVISION, TIMM = "torchvision:", "timm:"
PROGRAM_SUFFIX = ".pt2"
# torchvision builders that take a width multiplier (``width_mult``): a student of theirs can be sized by
# student_fraction; other foreign students are chosen among categorically.
TORCHVISION_WIDTH = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "mnasnet0_75",
                     "mnasnet1_0", "mnasnet1_3")


class ModelSourceError(UserError):
    """A model spec that cannot be built: names the spec and what to do."""


def is_program(spec: str) -> bool:
    return spec.endswith(PROGRAM_SUFFIX)


def is_foreign(spec: str) -> bool:
    """A spec that names a model outside the project's registry."""
    return ":" in spec or is_program(spec)


def kind(spec: str) -> str:
    """registered | torchvision | timm | callable | program."""
    if is_program(spec):
        return "program"
    if spec.startswith(TORCHVISION):
        return "torchvision"
    if spec.startswith(TIMM):
        return "timm"
    if ":" in spec:
        return "callable"
    return "registered"


def check_spec(spec: str, role: str) -> str | None:
    """Why ``spec`` cannot name a ``role`` (teacher | student) model, in one line, or None when it can
    (a cheap check: the builder exists; building and the forward check come later)."""
    k = kind(spec)
    if k == "program":
        if role != "teacher":
            return f"{role}: {spec!r} is an exported program; only a teacher can be one (a student is trained)"
        return None if os.path.isfile(spec) else f"{role}: program file {spec} not found; pass the path of a .pt2 file"
    try:
        _builder(spec)
    except ModelSourceError as e:
        return f"{role}: {e}"
    return None


def _torchvision_names() -> list[str]:
    import torchvision  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _builder(spec: str):
    """The callable that builds ``spec`` (not called). Raises ModelSourceError."""
    k = kind(spec)
    if k == "torchvision":
        import torchvision  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

        name = spec[len(TORCHVISION):]
        names = _torchvision_names()
        if name not in names:
            raise ModelSourceError(unknown(f"torchvision has no classification model {name!r}", names[:12],
                                           f"... ({len(names)} in all: torchvision.models.list_models())"))
        return torchvision.models.get_model_builder(name)
    if k == "timm":
        try:
            import timm  # noqa: PLC0415 - timm is an optional extra (pip install timm)
        except ImportError:
            raise ModelSourceError(f"{spec!r} needs timm, which is not installed; pip install timm "
                                   "(or pip install -e .[timm])") from None
        name = spec[len(TIMM):]
        if not timm.is_model(name):
            raise ModelSourceError(f"timm has no model {name!r}; list them with timm.list_models()")
        return lambda **kw: timm.create_model(name, pretrained=False, **kw)
    if k == "callable":
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelSourceError(f"{spec!r} is not package.module:callable")
        user_folder_importable()
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelSourceError(f"cannot import {module_name!r} for {spec!r} ({e}); run from the folder that "
                                   "holds it or add it to PYTHONPATH") from None
        except (Exception, SystemExit) as e:  # the user's module raised (or called sys.exit) while importing
            raise ModelSourceError(f"importing {module_name!r} for {spec!r} raised {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ModelSourceError(f"{module_name!r} has no callable {attr!r}; name a class or function that "
                                   "builds the model from num_classes=")
        return fn
    raise ModelSourceError(f"{spec!r} is not torchvision:NAME, timm:NAME or package.module:callable")


def user_folder_importable() -> None:
    """The folder the user runs from is importable (their own module named by a ``package.module:callable`` spec)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


WIDTH_ARGUMENT = "width_mult"  # what a factory of your own takes to be sized (as torchvision's MobileNets do)


def widthable(spec: str) -> bool:
    """Whether a foreign student has a width knob that ``student_fraction`` sizes it by: a torchvision MobileNet or
    MNASNet, or a factory of your own that takes ``width_mult=``."""
    if kind(spec) == "torchvision":
        return spec[len(TORCHVISION):] in TORCHVISION_WIDTH
    if kind(spec) == "callable":
        try:
            parameters = inspect.signature(_builder(spec)).parameters
        except (ModelSourceError, TypeError, ValueError):
            return False
        return WIDTH_ARGUMENT in parameters
    return False


def build_foreign(spec: str, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """Build a foreign classifier, untrained. Raises ModelSourceError (one line) where it cannot be built."""
    k = kind(spec)
    if k == "program":
        return load_program(spec)
    fn = _builder(spec)
    kwargs = {"num_classes": num_classes}
    if k == "timm":
        kwargs["in_chans"] = in_channels
    if width != 1.0:
        if not widthable(spec):
            raise ModelSourceError(f"{spec} has no width multiplier; choose students of it by name "
                                   "(student: {type: categorical, choices: [...]}) instead of a width or fraction")
        kwargs[WIDTH_ARGUMENT] = width
    if k == "torchvision" and spec[len(TORCHVISION):].startswith(("vit_", "swin_", "maxvit")):
        kwargs["image_size"] = image_size if spec[len(TORCHVISION):].startswith("vit_") else None
        kwargs = {k2: v for k2, v in kwargs.items() if v is not None}
    try:
        model = fn(**kwargs)
    except (Exception, SystemExit) as e:  # sys.exit() in a factory is its failure, not the command's end
        raise ModelSourceError(f"building {spec} with num_classes={num_classes} raised {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module; return the model")
    return model


class ExportedTeacher(nn.Module):
    """A ``torch.export`` program as a teacher module. The program was exported in eval mode and its graph fixes
    that mode: ``train()``/``eval()`` do not reach into it (a program refuses them)."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program
        if isinstance(program, torch.fx.GraphModule):
            tap_batch_norms(program)  # the BatchNorm-statistics term reaches its batch-norm operations

    def train(self, mode: bool = True) -> ExportedTeacher:
        self.training = False  # always evaluates: BatchNorm uses its running statistics, as exported
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.program(x)


def load_program(path: str) -> nn.Module:
    """A ``torch.export`` program file as a module (its weights inside), read as data by ``trainable.programs``:
    nothing in the file is unpickled or run. Raises ModelSourceError."""
    if not os.path.isfile(path):
        raise ModelSourceError(f"program file {path} not found; pass the path of a .pt2 file")
    try:
        return ExportedTeacher(load_module(path))
    except ProgramError as e:
        raise ModelSourceError(str(e)) from None


SMALL_BATCH = 2  # the small batch of the door check (train-mode BatchNorm needs two images)
SLOW_FORWARD_S = 3.0  # a check's forward slower than this says what is being checked


def check_forward(model: nn.Module, spec: str, num_classes: int, channels: int, image_size: int,
                  need_grad: bool = False, batch_size: int = 64, log=print, frozen: bool = False) -> None:
    """What a trial runs, once, on a batch of random images of the task's shape: a forward in train and eval mode
    (a program: eval, its mode is fixed) at ``batch_size`` (the run's) and at a small batch (1 for a program: it must
    take any batch size); a ``frozen`` model (a teacher: trials run it in eval mode only) in train mode at the small
    batch only. Each output must be one tensor (not a tuple: aux heads), of shape (N, num_classes), finite; with
    ``need_grad`` the input must get a finite, non-zero gradient through the model (the generator learns through
    it). BatchNorm statistics and gradients are left as they were. A forward slower than ``SLOW_FORWARD_S`` logs a
    line saying what is being checked. Raises ModelSourceError."""
    program = isinstance(model, ExportedTeacher)
    small = 1 if program else SMALL_BATCH
    sizes = sorted({small, max(small, int(batch_size))})
    train = [] if program else sizes[:1] if frozen else sizes
    checks = [("train", n) for n in train] + [("eval", n) for n in sizes]
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        for mode, n in checks:
            model.train(mode == "train")
            _check_one_forward(model, spec, num_classes, channels, image_size, need_grad, mode, n, log)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def _check_one_forward(model: nn.Module, spec: str, num_classes: int, channels: int, image_size: int,
                       need_grad: bool, mode: str, n: int, log) -> None:
    x = torch.randn(n, channels, image_size, image_size, requires_grad=need_grad)  # (N, C, H, W)
    shape = f"({n}, {channels}, {image_size}, {image_size})"
    slow = threading.Timer(SLOW_FORWARD_S, lambda: log and log(f"checking {spec}: a forward in {mode} mode on {n} "
                                                                f"random images {shape} (slow; still running)"))
    slow.daemon = True
    slow.start()
    try:
        with torch.set_grad_enabled(need_grad):
            out = model(x)
        if isinstance(out, torch.Tensor) and need_grad and out.requires_grad:
            out.float().sum().backward()
    except Exception as e:
        raise ModelSourceError(f"{spec} fails in {mode} mode on a batch of the task's shape {shape} "
                               f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); the model must take "
                               "the task's channels and image size at any batch size (a program: export it with "
                               "dynamic_shapes)") from None
    finally:
        slow.cancel()
    if isinstance(out, (tuple, list)):  # namedtuples included (torchvision's GoogLeNetOutputs, InceptionOutputs)
        raise ModelSourceError(f"{spec} returns a {type(out).__name__} in {mode} mode, not one tensor of class scores "
                               "(aux heads, like GoogLeNet's and Inception's in train mode); build it without them "
                               "(torchvision: aux_logits=False) or wrap it in a module whose forward returns the main "
                               "logits")
    if not isinstance(out, torch.Tensor):
        raise ModelSourceError(f"{spec} returns {type(out).__name__} in {mode} mode; its forward must return a tensor "
                               f"of class scores ({n}, {num_classes})")
    if tuple(out.shape) != (n, num_classes):
        raise ModelSourceError(f"{spec} outputs {tuple(out.shape)} for {n} images in {mode} mode; the task needs "
                               f"({n}, {num_classes}) class scores")
    if not bool(torch.isfinite(out).all()):
        raise ModelSourceError(f"{spec} outputs NaN/Inf in {mode} mode on a batch of {n} random images; check its "
                               "weights and its forward")
    if need_grad and (x.grad is None or not bool(torch.isfinite(x.grad).all()) or not bool(x.grad.abs().sum() > 0)):
        raise ModelSourceError(f"no gradient flows through {spec} to its input in {mode} mode; the generator learns "
                               "through it, so pass a differentiable model (not one exported for inference only)")


def check_student(spec: str, num_classes: int, channels: int, image_size: int, batch_size: int = 64,
                  log=print) -> None:
    """A foreign student builds and runs as a trial runs it (``check_forward``: train and eval mode, the run's batch
    and a small one, a gradient to the input); the project's own are tested. Raises ModelSourceError."""
    if is_foreign(spec):
        if is_program(spec):
            raise ModelSourceError(f"student: {spec} is an exported program; a student is trained, so name its model")
        check_forward(build_foreign(spec, num_classes, channels, image_size), spec, num_classes, channels, image_size,
                      need_grad=True, batch_size=batch_size, log=log)


def as_spec(spec: str | None) -> str | None:
    """A spec from the command line as a config holds it: a program file by its absolute path (a trial runs in a
    folder of its own)."""
    return str(Path(spec).expanduser().resolve()) if spec and is_program(spec) else spec
