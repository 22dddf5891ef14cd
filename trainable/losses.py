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
                if isinstance(m, nn.BatchNorm2d):
                    self._handles.append(m.register_forward_hook(self._bn_hook))
        if want_features:
            self._handles.append(head.register_forward_hook(self._head_hook))

    def _bn_hook(self, module: nn.BatchNorm2d, inputs, output):
        if not self.active:
            return
        x = inputs[0].float()  # (B, C, H, W)
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        self.bn_terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

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
