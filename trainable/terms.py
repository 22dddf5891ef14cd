"""The weighted terms of the student's and the generator's losses, as data: each names the config key of its weight
and the loss it adds, given what the step saw. A step's loss is its base term (the student's imitation loss; for the
generator, ``w_disagreement`` times its discrepancy loss) plus each registered term, in the order listed, whose
inputs the step produced and whose weight is not 0 (``always``: added whatever its weight, as the AVKD terms are).

A new term is two places: its entry here (its weight's key -> :class:`Term`) and its weight's field (default 0,
``trainable.config.AKDConfig``); the config check and the run read the registries when they run. A term reads the
step's :class:`Seen` and the run (its projector, its teacher probe).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from trainable.losses import activation_loss, balance_loss, feature_loss, onehot_loss


@dataclasses.dataclass
class Seen:
    """What one step computed on its generated images: the teacher's and the student's logits (B, K), and, where the
    step produced them, the classes asked for (B,) and the discriminator's logits (B,) (AVKD), the student's and the
    teacher's intermediate features (feature alignment)."""
    t_logits: torch.Tensor
    s_logits: torch.Tensor
    y: torch.Tensor | None = None
    d: torch.Tensor | None = None
    s_feats: list[torch.Tensor] | None = None
    t_feats: list[torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class Term:
    loss: Callable[[Any, Seen], torch.Tensor]  # (run, seen) -> a scalar
    needs: tuple[str, ...] = ()  # fields of Seen it reads that not every step produces
    always: bool = False  # added whatever its weight (where its inputs are there)
    what: str = ""

    def applies(self, weight: float, seen: Seen) -> bool:
        return all(getattr(seen, n) is not None for n in self.needs) and (self.always or bool(weight))


def _feature_gap(run, seen: Seen) -> torch.Tensor:
    return feature_loss(run.projector(seen.s_feats), seen.t_feats)


# The student's terms, added to its imitation loss (``student_loss``), by the key of their weight.
STUDENT_TERMS: dict[str, Term] = {
    "w_feature": Term(_feature_gap, ("s_feats", "t_feats"), what="match the teacher's intermediate features"),
}

# The generator's terms, added to ``w_disagreement`` times its discrepancy loss (``generator_loss``), in this order.
GENERATOR_TERMS: dict[str, Term] = {
    "w_discriminator": Term(lambda run, s: s.d.mean(), ("d",), always=True, what="AVKD: fool the discriminator"),
    "w_class": Term(lambda run, s: F.cross_entropy(s.t_logits, s.y), ("y",), always=True,
                    what="AVKD: the teacher recognises the class asked for"),
    "w_feature_adv": Term(lambda run, s: -_feature_gap(run, s), ("s_feats", "t_feats"),
                          what="maximise the student's and the teacher's feature gap"),
    "w_onehot": Term(lambda run, s: onehot_loss(s.t_logits), what="DAFL: the teacher is sure of a class"),
    "w_activation": Term(lambda run, s: activation_loss(run.probe.features.float()),
                         what="DAFL: the teacher's features are strongly activated"),
    "w_balance": Term(lambda run, s: balance_loss(s.t_logits), what="DAFL: the classes are equally frequent"),
    "w_bn": Term(lambda run, s: run.probe.bn_loss(), what="DeepInversion/DFQ: the teacher's BatchNorm statistics"),
}


def term_weights() -> tuple[str, ...]:
    """The config keys of every weight of the two losses (each must be >= 0)."""
    return ("w_disagreement", *STUDENT_TERMS, *GENERATOR_TERMS)


def add_terms(loss: torch.Tensor, terms: dict[str, Term], run, seen: Seen) -> torch.Tensor:
    """``loss`` plus each of ``terms`` that applies, times its weight (``run.cfg``'s; 0 where its config has no such
    field), in order."""
    for key, term in terms.items():
        weight = getattr(run.cfg, key, 0.0)
        if term.applies(weight, seen):
            loss = loss + weight * term.loss(run, seen)
    return loss
