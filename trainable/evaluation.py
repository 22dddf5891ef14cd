"""A model measured on labelled images (accuracy, mean cross-entropy, the confusion matrix) and the spread of the
classes a teacher sees in generated images: what every run, the export and the search's estimate measure with."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             device: torch.device | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model`` on (x, y); the confusion matrix if ``num_classes``.

    The model is put in eval mode and put back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    confusion = torch.zeros(num_classes or 1, num_classes or 1, dtype=torch.int64)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb).float()  # (b, K)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == yb).sum().item()
        if num_classes:
            confusion += torch.bincount(yb.cpu() * num_classes + pred.cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    model.train(was_training)
    n = max(1, len(y))
    out = {"acc": correct / n, "loss": loss_sum / n}
    if num_classes:
        out["confusion"] = confusion  # rows: true class, columns: predicted
    return out


def effective_classes(counts: torch.Tensor) -> float:
    """The effective number of classes in a histogram of predicted classes: exp of its entropy (K when all K classes
    are equally frequent, 1 when all images fall into one)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
