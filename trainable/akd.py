"""One data-free adversarial distillation run: setup -> fit (epochs of student/generator steps) -> save.

The loop, per iteration: ``n_student`` imitation steps (the student matches the frozen teacher on
freshly generated images), then ``n_generator`` adversarial steps (the generator moves towards
images where the two disagree). With ``method: avkd`` the generator is class-conditional, G(z, y),
and ``n_discriminator`` discriminator steps follow, D(x, y) telling generated images from prior
data. Feature alignment (``w_feature``, ``w_feature_adv``) adds a term on intermediate features to
the student's and the generator's losses under any method. Plain PyTorch; the Tune adapter lives
in ``trainable.tune_trainable``.

Example::

    run = AKDRun(cfg, teacher, load_eval_data(cfg.task_spec))
    run.fit(on_epoch=lambda metrics, run: print(metrics))
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

from base import metrics as M
from base.errors import ConfigError, NonFiniteLossError, lookup
from base.verdict import collapsed
from trainable.checkpoint import restore_run, run_state
from trainable.config import AKDConfig, recipe_value
from trainable.evaluation import effective_classes, evaluate
from trainable.losses import (
    GENERATOR_LOSSES,
    STUDENT_LOSSES,
    FeatureProjector,
    FeatureTap,
    TeacherProbe,
    has_batch_norm,
)
from trainable.models import (
    Discriminator,
    build_classifier,
    build_generator,
    classifier_head,
    count_flops,
    count_params,
    feature_layers,
)
from trainable.priors import load_prior
from trainable.proxy import agreement, build_proxy, classes_of, selection_metric
from trainable.sizing import student_width
from trainable.speed import Speed
from trainable.speed import resolve as resolve_speed
from trainable.tasks import EvalData, data_free
from trainable.terms import GENERATOR_TERMS, STUDENT_TERMS, Seen, add_terms


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_deterministic_algorithms() -> None:
    """PyTorch's deterministic algorithms where an operation has one (a warning names any that has not), cuDNN's
    benchmarking off, and cuBLAS's fixed workspace (read when CUDA starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics) and no parameter gradients, once."""
    model.eval()
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)  # drop gradients left over from its own training
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A frozen copy of an eval-mode model with each BatchNorm folded into the convolution before it.

    Exact up to float rounding in eval mode (BN is then an affine map); gradients still flow to the
    input. Models that cannot be traced are returned unchanged.
    """
    try:
        fused = fuse(copy.deepcopy(model).eval())
    except Exception:  # not symbolically traceable: run it as it is
        return model
    return freeze(fused)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names and bytes): identifies a teacher across runs."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _make_scheduler(cfg: AKDConfig, opt: torch.optim.Optimizer):
    if cfg.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, cfg.lr_milestone_epochs, cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, cfg.gamma)
    return None  # "none": constant learning rates


class AKDRun:
    """A data-free adversarial distillation run.

    Args:
        cfg: the validated configuration.
        teacher: the pretrained teacher; it is frozen here (eval mode, no gradients) and never changed.
        data: validation and test tensors of the task (no training data).
        device: defaults to CUDA when present.
        prior: AVKD's prior images (N, C, H, W), normalised; None loads ``cfg.prior`` (``data_root`` for
            the CIFAR priors).
        speed: the measured choice for ``auto`` precision and layout (``trainable.speed.choose_speed``);
            None: fp32 with contiguous tensors where the config says auto.
    """

    def __init__(self, cfg: AKDConfig, teacher: nn.Module, data: EvalData, device: torch.device | None = None,
                 prior: torch.Tensor | None = None, data_root: str | None = None, speed: Speed | None = None):
        self.cfg = cfg
        self.device = device or default_device()
        self.task = cfg.task_spec  # resolved once, where the config was built
        self.data = data
        self.notes: list[str] = []  # what a user should know about this run (the CLI prints them)
        self._setup_seeds()
        self._setup_speed(speed)
        self._setup_teacher(teacher)
        self._setup_models()
        self._setup_optimizers()
        self._setup_avkd(prior, data_root)
        self._setup_losses()
        self._setup_selection(data_root)
        self._count_classes()
        self.epoch = 0  # epochs completed
        self.best_selected = -math.inf  # the best value of the selection metric so far, and its epoch
        self.best_epoch = 0
        self.history: list[dict[str, float]] = []
        self.stopped_early = False

    def _count_classes(self) -> None:
        """From here on, count the teacher's predicted classes of the images the student trains on (M.GEN_CLASSES)."""
        self.class_counts = torch.zeros(self.task.num_classes, dtype=torch.int64, device=self.device)  # (K,)

    def _setup_seeds(self) -> None:
        if self.cfg.deterministic:
            use_deterministic_algorithms()
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)

    def _setup_speed(self, speed: Speed | None) -> None:
        """The precision and layout this run computes in, with how they were decided (recorded in checkpoints and
        final.json)."""
        cfg = self.cfg
        self.precision, self.channels_last = resolve_speed(cfg, speed)
        fixed = cfg.precision != "auto" and cfg.channels_last != "auto"
        self.speed = dataclasses.replace(speed or Speed("fp32", False, "fixed" if fixed else "default"),
                                         precision=self.precision, channels_last=self.channels_last)
        self._format = torch.channels_last if self.channels_last else torch.contiguous_format
        self._autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None

    def _setup_teacher(self, teacher: nn.Module) -> None:
        """The frozen teacher, and the module the steps run: the teacher with BatchNorm folded into its convolutions
        (exact in eval mode, fewer memory passes), unless the BN-statistics loss needs its BN layers or feature
        alignment its layers."""
        cfg = self.cfg
        self.teacher = freeze(teacher).to(self.device, memory_format=self._format)
        self._fit_recipe_to_teacher()
        cfg = self.cfg
        self.teacher_params = count_params(self.teacher)
        self.teacher_fingerprint = fingerprint(self.teacher)
        self.avkd = cfg.method == "avkd"
        self.align = cfg.w_feature > 0 or cfg.w_feature_adv > 0
        keep = cfg.w_bn > 0 or self.align
        self.teacher_fwd = self.teacher if keep else fold_batchnorm(self.teacher).to(memory_format=self._format)
        if not keep and self.teacher_fwd is self.teacher and any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
            self.notes.append(f"the teacher {cfg.teacher} cannot be traced by torch.fx, so its BatchNorm layers run "
                              "unfolded (the same results, a little slower)")

    def _fit_recipe_to_teacher(self) -> None:
        """The BatchNorm-statistics term needs BatchNorm layers in the teacher: where the teacher has none, the
        task's recipe value of ``w_bn`` is dropped with a note; any other value is refused, naming this teacher."""
        cfg = self.cfg
        if cfg.w_bn <= 0 or has_batch_norm(self.teacher):
            return
        if cfg.w_bn == recipe_value(cfg, "w_bn"):
            self.cfg = dataclasses.replace(cfg, w_bn=0.0)
            self.notes.append(f"the task's BatchNorm-statistics term (w_bn {cfg.w_bn:g}) is dropped: the teacher "
                              f"{cfg.teacher} has no BatchNorm layers to match")
            return
        raise ConfigError(f"w_bn: the BatchNorm-statistics term matches the teacher's BatchNorm statistics, and the "
                          f"teacher {cfg.teacher} has no BatchNorm layers (nor batch-norm operations in its program): set "
                          "w_bn=0")

    def _setup_models(self) -> None:
        """The student (sized against the teacher), the generator and, for feature alignment, the projection."""
        cfg, t = self.cfg, self.task
        self.student_width = student_width(cfg, self.teacher_params)
        self.student = build_classifier(cfg.student, t.num_classes, t.channels, t.image_size,
                                        self.student_width).to(self.device, memory_format=self._format)
        self.generator = build_generator(cfg.generator, cfg.latent_dim, cfg.generator_width, t.channels,
                                         t.image_size, num_classes=t.num_classes if self.avkd else 0).to(self.device)
        self.student_params = count_params(self.student)
        self.student_flops = count_flops(self.student, t.channels, t.image_size)
        self.projector = self._feature_alignment() if self.align else None

    def _setup_optimizers(self) -> None:
        """SGD for the student (and the projection), Adam for the generator, each with the configured schedule."""
        cfg = self.cfg
        student_params = list(self.student.parameters())
        if self.projector is not None:
            student_params += list(self.projector.parameters())
        self.opt_student = torch.optim.SGD(student_params, lr=cfg.lr_student, momentum=cfg.momentum,
                                           nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.opt_generator = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator,
                                              betas=(cfg.beta1, cfg.beta2))
        self.sched_student = _make_scheduler(cfg, self.opt_student)
        self.sched_generator = _make_scheduler(cfg, self.opt_generator)

    def _setup_avkd(self, prior: torch.Tensor | None, data_root: str | None) -> None:
        """AVKD's discriminator, its optimiser and the prior images (nothing for the other methods)."""
        cfg, t = self.cfg, self.task
        self.discriminator = self.opt_discriminator = self.sched_discriminator = None
        if not self.avkd:
            return
        self.discriminator = Discriminator(t.channels, t.num_classes, cfg.discriminator_width).to(self.device)
        self.opt_discriminator = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_discriminator,
                                                  betas=(cfg.beta1, cfg.beta2))
        self.sched_discriminator = _make_scheduler(cfg, self.opt_discriminator)
        self.prior = load_prior(cfg.prior, self.task, data_root, cfg.seed) if prior is None else prior
        weights = torch.tensor(cfg.class_prior) if cfg.class_prior else torch.ones(t.num_classes)
        self.class_weights = weights.float()

    def _setup_losses(self) -> None:
        """The student's and the generator's losses, and the probe that reads what the generator's terms need."""
        cfg = self.cfg
        self.student_loss = lookup(STUDENT_LOSSES, "student loss", cfg.student_loss)
        self.generator_loss = lookup(GENERATOR_LOSSES, "generator loss", cfg.generator_loss)
        self.probe = TeacherProbe(self.teacher_fwd, self._teacher_head() if cfg.w_activation > 0 else None,
                                  want_bn=cfg.w_bn > 0, want_features=cfg.w_activation > 0)

    def _setup_selection(self, data_root: str | None) -> None:
        """What the run selects on: val_acc, or val_agreement on a proxy set (trainable/proxy.py)."""
        cfg = self.cfg
        self.selection = selection_metric(cfg.selection, self.task)
        self.proxy = self.proxy_classes = None
        if self.selection == M.VAL_AGREEMENT:
            self.proxy = build_proxy(cfg, self.task, self.data, data_root)
            self.proxy_classes = {split: classes_of(self.teacher, x, self.device, cfg.eval_batch_size)
                                  for split, x in (("val", self.proxy.val_x), ("test", self.proxy.test_x))}

    def _teacher_head(self) -> nn.Linear:
        """The teacher's final linear layer (DAFL's activation loss reads its input)."""
        try:
            return classifier_head(self.teacher_fwd)
        except ValueError:
            raise ConfigError(f"w_activation: the activation term reads the input of the teacher's linear head; "
                              f"{self.cfg.teacher} has none to hook: set w_activation=0") from None

    def _feature_alignment(self) -> FeatureProjector:
        """Hooks on the aligned layers of teacher and student, and the projection between their widths."""
        cfg, t = self.cfg, self.task
        try:
            self.teacher_tap = FeatureTap(self.teacher_fwd, feature_layers(cfg.teacher, cfg.feature_layers, self.teacher_fwd))
            self.student_tap = FeatureTap(self.student, feature_layers(cfg.student, cfg.feature_layers, self.student))
            probe = torch.zeros(2, t.channels, t.image_size, t.image_size, device=self.device)
            was_training = self.student.training
            self.student.eval()
            with torch.no_grad():
                self.teacher_tap.start()
                self.teacher_fwd(probe)
                t_shapes = [f.shape for f in self.teacher_tap.collect()]
                self.student_tap.start()
                self.student(probe)
                s_shapes = [f.shape for f in self.student_tap.collect()]
            self.student.train(was_training)
            return FeatureProjector(s_shapes, t_shapes, cfg.feature_projection).to(self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _noise(self) -> torch.Tensor:
        return torch.randn(self.cfg.batch_size, self.cfg.latent_dim, device=self.device)  # (B, nz)

    def _labels(self) -> torch.Tensor:
        """Classes requested from the conditional generator, drawn from the class prior: (B,) int64."""
        return torch.multinomial(self.class_weights, self.cfg.batch_size, replacement=True).to(self.device)

    def generate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch of images (B, C, H, W) and, for a conditional generator, the classes asked for (B,)."""
        if self.avkd:
            y = self._labels()
            return self.generator(self._noise(), y), y
        return self.generator(self._noise()), None

    @torch.no_grad()
    def synthesize(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]]:
        """``n`` batches of fresh images, their teacher logits and (feature alignment) teacher features.

        The generator does not change during student steps, so the images of all ``n`` steps can be
        made up front: one generator call per batch (its train-mode BatchNorm sees the same batches
        as step-by-step generation) and one teacher call for all of them (in eval mode each image's
        logits do not depend on the batch). Built without a graph: detached by construction.
        """
        with self._autocast():
            fakes = [self.generate()[0] for _ in range(n)]  # n x (B, C, H, W)
            if self.align:
                self.teacher_tap.start()
            t_logits = self.teacher_fwd(torch.cat(fakes))  # (n * B, K)
            feats = self.teacher_tap.collect() if self.align else None
        b = self.cfg.batch_size
        per_batch = [[f[i * b:(i + 1) * b] for f in feats] if feats else None for i in range(n)]
        return list(zip(fakes, t_logits.split(b), per_batch))

    def student_step(self, fake: torch.Tensor | None = None, t_logits: torch.Tensor | None = None,
                     t_feats: list[torch.Tensor] | None = None) -> dict[str, float]:
        """One imitation step: images and teacher targets (from ``synthesize`` if not given), student update."""
        if fake is None or t_logits is None:
            fake, t_logits, t_feats = self.synthesize(1)[0]  # (B, C, H, W), (B, K), features
        with self._autocast():
            if self.align:
                self.student_tap.start()
            s_logits = self.student(fake)  # (B, K)
            s_feats = self.student_tap.collect() if self.align else None
        loss = self.student_loss(s_logits.float(), t_logits.float(), self.cfg.temperature)
        loss = add_terms(loss, STUDENT_TERMS, self, Seen(t_logits, s_logits, s_feats=s_feats, t_feats=t_feats))
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.student_grad_clip > 0:
            nn.utils.clip_grad_norm_(self.opt_student.param_groups[0]["params"], self.cfg.student_grad_clip)
        self.opt_student.step()
        return {M.LOSS_STUDENT: loss.item()}

    def generator_step(self) -> dict[str, float]:
        """One adversarial step: gradients reach the generator only (student, teacher, D weights frozen)."""
        cfg = self.cfg
        frozen = [m for m in (self.student, self.projector, self.discriminator) if m is not None]
        for m in frozen:
            m.requires_grad_(False)  # no weight gradients are computed for them here
        feature_adv = self.align and cfg.w_feature_adv > 0
        try:
            with self._autocast():
                fake, y = self.generate()  # (B, C, H, W), (B,) or None
                self.probe.start()
                if feature_adv:
                    self.teacher_tap.start()
                t_logits = self.teacher_fwd(fake).float()  # (B, K); gradient flows to the image only
                self.probe.stop()
                t_feats = self.teacher_tap.collect() if feature_adv else None
                if feature_adv:
                    self.student_tap.start()
                s_logits = self.student(fake).float()  # (B, K)
                s_feats = self.student_tap.collect() if feature_adv else None
                d = self.discriminator(fake, y).float() if self.avkd else None  # (B,)
            loss = cfg.w_disagreement * self.generator_loss(s_logits, t_logits, cfg.temperature)
            loss = add_terms(loss, GENERATOR_TERMS, self, Seen(t_logits, s_logits, y, d, s_feats, t_feats))
            self.opt_generator.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_generator.step()
        finally:
            self.probe.stop()
            for m in frozen:
                m.requires_grad_(True)
        return {M.LOSS_GENERATOR: loss.item()}

    def discriminator_step(self) -> dict[str, float]:
        """AVKD: D learns to output high logits on generated (x, y) and low ones on prior images (BCE)."""
        with torch.no_grad(), self._autocast():
            fake, y = self.generate()  # (B, C, H, W), (B,)
        idx = torch.randint(len(self.prior), (self.cfg.batch_size,))
        x_prior = self.prior[idx].to(self.device, non_blocking=True)  # (B, C, H, W)
        y_prior = self._labels()  # classes for prior images are drawn like the generator's
        with self._autocast():
            d_fake = self.discriminator(fake, y).float()  # (B,)
            d_prior = self.discriminator(x_prior, y_prior).float()
        loss = (F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
                + F.binary_cross_entropy_with_logits(d_prior, torch.zeros_like(d_prior)))
        self.opt_discriminator.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_discriminator.step()
        return {M.LOSS_DISCRIMINATOR: loss.item()}

    @staticmethod
    def _check(value: float, name: str, where: str):
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{name} became {value} at {where}; lower the learning rates or change the loss")

    # ------------------------------------------------------------------ epochs
    def iteration(self, where: str = "iteration") -> tuple[float, float, float]:
        """One AKD iteration: ``n_student`` imitation steps, ``n_generator`` adversarial steps, and (AVKD)
        ``n_discriminator`` discriminator steps. Returns the sums of their losses; a NaN/Inf loss raises,
        naming ``where`` and the step."""
        cfg = self.cfg
        sum_s = sum_g = sum_d = 0.0
        for k, (fake, t_logits, t_feats) in enumerate(self.synthesize(cfg.n_student)):
            self.class_counts += torch.bincount(t_logits.argmax(1), minlength=self.task.num_classes)
            ls = self.student_step(fake, t_logits, t_feats)[M.LOSS_STUDENT]
            self._check(ls, M.LOSS_STUDENT, f"{where} student step {k + 1}")
            sum_s += ls
        for k in range(cfg.n_generator):
            lg = self.generator_step()[M.LOSS_GENERATOR]
            self._check(lg, M.LOSS_GENERATOR, f"{where} generator step {k + 1}")
            sum_g += lg
        for k in range(cfg.n_discriminator if self.avkd else 0):
            ld = self.discriminator_step()[M.LOSS_DISCRIMINATOR]
            self._check(ld, M.LOSS_DISCRIMINATOR, f"{where} discriminator step {k + 1}")
            sum_d += ld
        return sum_s, sum_g, sum_d

    def train_epoch(self) -> dict[str, float]:
        """One epoch of iterations, then validation. Returns the flat per-epoch metrics."""
        cfg = self.cfg
        self.student.train()
        self.generator.train()
        lr_s = self.opt_student.param_groups[0]["lr"]
        lr_g = self.opt_generator.param_groups[0]["lr"]
        sum_s = sum_g = sum_d = 0.0
        n_d = cfg.n_discriminator if self.avkd else 0
        self._count_classes()
        start = time.perf_counter()
        for it in range(cfg.iters_per_epoch):
            ls, lg, ld = self.iteration(f"epoch {self.epoch + 1} iteration {it + 1}")
            sum_s, sum_g, sum_d = sum_s + ls, sum_g + lg, sum_d + ld
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        for sched in (self.sched_student, self.sched_generator, self.sched_discriminator):
            if sched is not None:
                sched.step()
        self.epoch += 1
        val = self.measure("val")
        if val[self.selection] > self.best_selected:
            self.best_selected, self.best_epoch = val[self.selection], self.epoch
        images = cfg.batch_size * (cfg.n_student + cfg.n_generator + n_d) * cfg.iters_per_epoch
        spread = effective_classes(self.class_counts.cpu())
        metrics = {
            M.EPOCH: self.epoch,
            **val,
            M.LOSS_STUDENT: sum_s / (cfg.iters_per_epoch * cfg.n_student),
            M.LOSS_GENERATOR: sum_g / (cfg.iters_per_epoch * cfg.n_generator),
            M.STUDENT_PARAMS: self.student_params,
            M.TEACHER_PARAMS: self.teacher_params,
            M.PARAM_RATIO: self.student_params / self.teacher_params,
            M.FLOPS: self.student_flops,
            M.IMAGES_PER_S: images / max(train_s, 1e-9),
            M.TRAIN_THREADS: torch.get_num_threads(),
            M.LR_STUDENT: lr_s,
            M.LR_GENERATOR: lr_g,
            M.GEN_CLASSES: spread,
            M.GEN_COLLAPSED: float(collapsed(spread, self.task.num_classes)),
        }
        if n_d:
            metrics[M.LOSS_DISCRIMINATOR] = sum_d / (cfg.iters_per_epoch * n_d)
        return metrics

    def measure(self, split: str, confusion: bool = False) -> dict[str, Any]:
        """The student on the ``val`` or ``test`` half: accuracy (and loss) where the task has labels, agreement with
        the teacher where the run selects on it; the confusion matrix (``confusion`` key) when asked and labelled."""
        d, bs, out = self.data, self.cfg.eval_batch_size, {}
        if d.labelled:
            x, y = (d.val_x, d.val_y) if split == "val" else (d.test_x, d.test_y)
            r = evaluate(self.student, x, y, bs, self.device, num_classes=self.task.num_classes if confusion else None)
            out = {M.VAL_ACC: r["acc"], M.VAL_LOSS: r["loss"]} if split == "val" else {M.TEST_ACC: r["acc"]}
            if confusion:
                out["confusion"] = r["confusion"]
        if self.proxy is not None:
            x = self.proxy.val_x if split == "val" else self.proxy.test_x
            out[M.VAL_AGREEMENT if split == "val" else M.TEST_AGREEMENT] = agreement(
                self.student, x, self.proxy_classes[split], self.device, bs)
        return out

    def should_stop(self) -> bool:
        p = self.cfg.early_stop_patience
        return p > 0 and self.epoch - self.best_epoch >= p

    def fit(self, on_epoch: Callable[[dict[str, float], AKDRun], None] | None = None,
            max_epochs: int | None = None) -> list[dict[str, float]]:
        """Train until ``cfg.epochs`` (or ``max_epochs`` more epochs, or early stop).

        ``on_epoch(metrics, run)`` is called after each epoch (report, checkpoint).
        """
        stop_at = self.cfg.epochs if max_epochs is None else min(self.cfg.epochs, self.epoch + max_epochs)
        with data_free():
            while self.epoch < stop_at:
                metrics = self.train_epoch()
                self.history.append(metrics)
                if on_epoch is not None:
                    on_epoch(metrics, self)
                if self.should_stop():
                    self.stopped_early = True
                    break
        return self.history

    # ------------------------------------------------------------------ checkpoints (trainable.checkpoint)
    def state_dict(self) -> dict[str, Any]:
        """One dict holding everything a resume needs (loadable with ``weights_only=True``)."""
        return run_state(self)

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a checkpoint from :meth:`state_dict`; everything that must match is checked first."""
        restore_run(self, ckpt)
