"""The shipped tasks as data: ``Task`` (what is distilled: classes, image shape, normalisation, the teacher family,
the config defaults) and ``TASKS``, with each recipe's defaults. Folder tasks (``trainable.images``) are ``Task``s
too, and may take a shipped task's recipe; resolving a name and loading data is ``trainable.tasks``. Before a run, a
recipe is fitted to its teacher (``trainable.fitting``): a teacher without BatchNorm statistics (MNIST's LeNet-5
among them) takes the BatchNorm-free terms and student instead of these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher: str  # default teacher architecture
    defaults: dict[str, Any] = field(default_factory=dict)  # config defaults for this task
    doc: str = ""
    classes: tuple[str, ...] = ()  # class names in the teacher's output order, where the task knows them
    notes: tuple[str, ...] = ()  # what the task assumed (a folder task's normalisation), said once by the CLIs
    labelled: bool = True  # False: a folder task without labels (its runs select on agreement, trainable.proxy)


# Digits recipe: DFAD's loop plus the BatchNorm-statistics term, which keeps the generator's
# images near the teacher's data on this tiny task (plain DFAD plateaus near 0.85 test accuracy
# here). Batch 96 and a generator of width 16: an iteration costs 1/1.75 of batch 128 at width 32
# (the generator's convolutions were a third of it) for -0.28 points of held-out accuracy at the
# default search's winning setting (standard error 0.53, seeds 0-3; bench/digits_recipe.py), so the
# default search fits 5 minutes on a 2-core CPU without AVX-512 (docs/speed.md).
_DIGITS_DEFAULTS = dict(
    teacher="cnn", student="cnn", student_fraction=0.08, generator="dfad", latent_dim=64, generator_width=16,
    epochs=30, iters_per_epoch=20, batch_size=96, n_student=5, n_generator=1,
    lr_student=0.1, lr_generator=1e-3, scheduler="cosine", w_bn=0.1, prior="letters",
    # AVKD's generator terms at 0.1: at the method's weights of 1, the discriminator and class terms
    # drove the generator to one letter-like image per class (15-epoch test accuracy 0.41-0.69).
    w_discriminator=0.1, w_class=0.1,
)
# DFAD's CIFAR recipe (500 epochs x 50 iterations, batch 256, 5:1, L1, SGD 0.1 / Adam 1e-3); AVKD's
# prior is the other CIFAR (the paper's pairings).
_CIFAR_DEFAULTS = dict(
    teacher="resnet34", student="resnet18", generator="dfad", latent_dim=256, generator_width=64,
    epochs=500, iters_per_epoch=50, batch_size=256, n_student=5, n_generator=1,
    lr_student=0.1, lr_generator=1e-3, scheduler="multistep", milestones=(0.2, 0.4), gamma=0.1,
)
_MNIST_DEFAULTS = dict(
    teacher="lenet5", student="lenet5", student_width=0.5, generator="dfad", latent_dim=100, generator_width=64,
    epochs=100, iters_per_epoch=50, batch_size=256, n_student=5, n_generator=1,
    lr_student=0.1, lr_generator=1e-3, scheduler="multistep", milestones=(0.5, 0.75), gamma=0.1, prior="letters",
)

TASKS: dict[str, Task] = {
    "digits": Task("digits", 10, 1, 8, (0.5,), (0.5,), "cnn", _DIGITS_DEFAULTS,
                   "scikit-learn's bundled 8x8 digits; needs no network (the default)"),
    "mnist": Task("mnist", 10, 1, 28, (0.1307,), (0.3081,), "lenet5", _MNIST_DEFAULTS, "torchvision MNIST"),
    "cifar10": Task("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "resnet34",
                    {**_CIFAR_DEFAULTS, "prior": "cifar100"}, "torchvision CIFAR-10"),
    "cifar100": Task("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "resnet34",
                     {**_CIFAR_DEFAULTS, "prior": "cifar10"}, "torchvision CIFAR-100"),
    # AVKD's Tiny-ImageNet setting: ResNet-34 -> ResNet-18 (CIFAR stems) at 64 x 64, a folder:PATH prior of
    # other photos (the paper used Caltech images).
    "tinyimagenet": Task("tinyimagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), "resnet34",
                         {**_CIFAR_DEFAULTS, "batch_size": 128, "prior": "photos"},
                         "Tiny-ImageNet (64 x 64, 200 classes), its official val/ split, --data-root"),
}
TASK_FORMS = ("or folder:PATH (your own labelled images, one sub-folder per class; or a task.yaml with the class count "
              "and no labels)")
