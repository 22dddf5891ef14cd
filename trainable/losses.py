"""Losses: student imitation losses, generator adversarial objectives, optional generator terms.

All take logits ``s`` (student) and ``t`` (teacher), shape (B, K), and return a scalar. The
generator objectives are *minimised* by the generator, hence their negative sign: the generator
maximises student-teacher disagreement.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6


def l1(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.l1_loss(s, t)


def l2(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.mse_loss(s, t)


def kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton)."""
    T = temperature
    return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T


def neg_l1(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return -l1(s, t)


def neg_log_l2(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-log(||S - T||^2 + eps), the squared norm taken per sample and averaged."""
    return -torch.log((s - t).pow(2).sum(1).mean() + EPS)


def neg_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return -kl(s, t, temperature)


LossFn = Callable[..., torch.Tensor]
STUDENT_LOSSES: dict[str, LossFn] = {"l1": l1, "l2": l2, "kl": kl}
GENERATOR_LOSSES: dict[str, LossFn] = {"neg_l1": neg_l1, "neg_log_l2": neg_log_l2, "neg_kl": neg_kl}




# ---------------------------------------------------------------------------------------------
# Optional generator terms (weight 0 by default)
# ---------------------------------------------------------------------------------------------
def onehot_loss(t: torch.Tensor) -> torch.Tensor:
    """DAFL: the teacher should be confident, cross-entropy against its own arg-max."""
    return F.cross_entropy(t, t.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL: large penultimate activations of the teacher (negative L1 norm, per element)."""
    return -features.abs().mean()


def balance_loss(t: torch.Tensor) -> torch.Tensor:
    """DAFL: classes balanced over the batch: log K - H(mean softmax), >= 0, 0 when uniform."""
    p = F.softmax(t.float(), 1).mean(0)  # (K,)
    return math.log(t.shape[1]) + (p * torch.log(p.clamp_min(1e-12))).sum()


class BatchNormTap(nn.Module):
    """Marks the input of a batch-norm operation inside a ``torch.export`` program's graph (``tap_batch_norms``):
    returns the input unchanged; a forward hook (``TeacherProbe``) reads the input and the running statistics the
    operation normalises it with, as it reads an ``nn.BatchNorm2d``'s."""

    def forward(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        return x


# The ATen batch-norm operations a program's graph holds in eval mode; their arguments 0, 3 and 4 are the input, the
# running mean and the running variance.
BATCH_NORM_OPS = frozenset(("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                            "cudnn_batch_norm", "miopen_batch_norm"))


def tap_batch_norms(program: torch.fx.GraphModule) -> int:
    """Put a ``BatchNormTap`` before each batch-norm operation (with running statistics) of a program's graph, so
    the BatchNorm-statistics term can match them as it matches a module's; returns how many. The program computes
    exactly what it did."""
    graph, n = program.graph, 0
    for node in list(graph.nodes):
        packet = getattr(node.target, "overloadpacket", None)
        if node.op != "call_function" or getattr(packet, "__name__", None) not in BATCH_NORM_OPS or len(node.args) < 5:
            continue
        x, mean, var = node.args[0], node.args[3], node.args[4]
        if not all(isinstance(a, torch.fx.Node) for a in (x, mean, var)):
            continue  # no running statistics to match (a batch-statistics-only norm)
        name = f"akdtune_bn_tap_{n}"
        program.add_submodule(name, BatchNormTap())
        with graph.inserting_before(node):
            tapped = graph.call_module(name, (x, mean, var))
        node.update_arg(0, tapped)
        n += 1
    if n:
        program.recompile()
    return n


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the BatchNorm-statistics term has something to match in ``model``: BatchNorm layers with running
    statistics, or batch-norm operations of a program's graph (tapped)."""
    return any((isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats) or isinstance(m, BatchNormTap)
               for m in model.modules())


class TeacherProbe:
    """Forward hooks on the frozen teacher that collect what the optional terms need.

    BatchNorm statistics of the batch (for the BN loss) and the input of the classifier head (for
    the activation loss) are captured only when their weights are non-zero, so the default run
    pays nothing.
    """

    def __init__(self, teacher: nn.Module, head: nn.Linear, want_bn: bool, want_features: bool):
        self._handles = []
        self.bn_terms: list[torch.Tensor] = []
        self.features: torch.Tensor | None = None
        self.active = False
        if want_bn:
            for m in teacher.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNormTap)):
                    self._handles.append(m.register_forward_hook(self._bn_hook))
        if want_features:
            self._handles.append(head.register_forward_hook(self._head_hook))

    def _bn_hook(self, module: nn.Module, inputs, output):
        if not self.active:
            return
        x = inputs[0].float()  # (B, C, ...): (B, C, H, W) for a 2-d BatchNorm
        if isinstance(module, BatchNormTap):
            running_mean, running_var = inputs[1], inputs[2]  # (C,), (C,): the program's own buffers
        else:
            running_mean, running_var = module.running_mean, module.running_var
        dims = [d for d in range(x.dim()) if d != 1]  # every dimension but the channels
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self.bn_terms.append(torch.norm(mean - running_mean, 2) + torch.norm(var - running_var, 2))

    def _head_hook(self, module: nn.Linear, inputs, output):
        if self.active:
            self.features = inputs[0]  # (B, D)

    def start(self):
        self.active, self.bn_terms, self.features = True, [], None

    def stop(self):
        self.active = False

    def bn_loss(self) -> torch.Tensor:
        return torch.stack(self.bn_terms).sum()



# ---------------------------------------------------------------------------------------------
# Feature alignment (any method)
# ---------------------------------------------------------------------------------------------
def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Normalised MSE between paired feature maps, averaged over the pairs.

    Each sample's flattened feature map is divided by its L2 norm, so layers of any scale weigh
    alike; per pair the loss is mean over the batch of ||s/|s| - t/|t|||^2, in [0, 4].
    Where spatial sizes differ, both are average-pooled to the smaller one.
    """
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        s = F.normalize(s.flatten(1), dim=1)  # (B, D)
        t = F.normalize(t.flatten(1), dim=1)
        total = total + (s - t).pow(2).sum(1).mean()
    return total / max(1, len(student))


class FeatureTap:
    """Forward hooks that keep the outputs of named modules while active (``start`` .. ``collect``)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feature_layers: {missing[0]!r} is not a layer of {type(model).__name__}")
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.active:
                self.outputs[name] = output

        return hook

    def start(self) -> None:
        self.active, self.outputs = True, {}

    def collect(self) -> list[torch.Tensor]:
        """The captured outputs in ``names`` order; stops capturing."""
        self.active = False
        return [self.outputs[n] for n in self.names]


class FeatureProjector(nn.Module):
    """Per aligned layer, a learned 1x1 projection from the student's width to the teacher's, where they
    differ (identity where they match). Trained with the student."""

    def __init__(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], project: bool):
        super().__init__()
        maps = []
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if s[1] == t[1]:
                maps.append(nn.Identity())
            elif not project:
                raise ValueError(f"feature_layers: layer {i + 1} has {s[1]} student channels and {t[1]} teacher "
                                 "channels; set feature_projection: true to learn a projection between them")
            elif len(s) == 4:
                maps.append(nn.Conv2d(s[1], t[1], 1, bias=False))
            else:
                maps.append(nn.Linear(s[1], t[1], bias=False))
        self.maps = nn.ModuleList(maps)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(f.float()) for m, f in zip(self.maps, feats)]  # fp32 even when the features are bf16
