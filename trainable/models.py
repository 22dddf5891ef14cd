"""Teachers, students and generators, as registries of plain builders.

The CIFAR ResNets keep the parameter names of the public DFAD/DAFL code (``conv1``, ``bn1``,
``layer1``..``layer4``, ``shortcut.0/1`` in downsampling blocks, ``linear``), so teacher
checkpoints published with those projects load as they are.

Every builder takes ``(num_classes, in_channels, image_size, width)`` keyword arguments; ``width``
is a multiplier of the family's base width (1.0 = the published layout).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from base.errors import lookup, unknown
from trainable import sources


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (3x3 stem, no max-pool)
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # Names shortcut.0 / shortcut.1 match the published checkpoints.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem; ``widths`` are the four stage widths."""

    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, widths[-1])
        return self.linear(out)  # (B, num_classes)


def _scaled(base: int, width: float) -> int:
    """Channels at a width multiplier, on the family's integer grid (at least 1)."""
    return max(1, int(round(base * width)))


def cifar_resnet(arch: Arch, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    c = _scaled(arch.base, width)
    return CifarResNet(arch.depths, (c, 2 * c, 4 * c, 8 * c), num_classes, in_channels)


def torchvision_resnet34(arch: Arch, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """torchvision's ResNet-34 (7x7 stem with max-pool)."""
    import torchvision  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

    if width != 1.0:
        raise ValueError("torchvision resnet34 has no width multiplier; use resnet34_w")
    model = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


# ---------------------------------------------------------------------------------------------
# Small CNNs for 8x8 digits and 28x28 MNIST
# ---------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv-bn-relu x3 (c, 2c, 4c) with one 2x down-sampling, global pool, linear."""

    def __init__(self, num_classes: int, in_channels: int, base: int):
        super().__init__()
        c = base
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True),
        )
        self.linear = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (B, 4c)
        return self.linear(out)


def small_cnn(arch: Arch, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    return SmallCNN(num_classes, in_channels, _scaled(arch.base, width))


LENET_SIZES = range(16, 33, 2)  # LeNet-5 sees 32 x 32: an even side up to 32 is padded to it


class LeNet5(nn.Module):
    """LeNet-5 as in DFAD's MNIST teacher (ReLU, max-pool): 32 x 32 input, a smaller even side padded to it (MNIST's
    28 by 2 pixels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 28):
        super().__init__()
        if image_size not in LENET_SIZES:
            raise ValueError(size_problem("lenet5", image_size))
        c1, c2, c3 = (max(1, int(round(k * width))) for k in (6, 16, 120))
        pad = (32 - image_size) // 2  # the first convolution gives 28 x 28 at every side taken
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5), nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(nn.Linear(c3, max(1, int(round(84 * width)))), nn.ReLU(inplace=True))
        self.linear = nn.Linear(max(1, int(round(84 * width))), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, side, side)
        out = self.features(x)  # (B, c3, 1, 1)
        return self.linear(self.fc(out.flatten(1)))


def lenet5(arch: Arch, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    return LeNet5(num_classes, in_channels, width, image_size)


def size_problem(name: str, image_size: int) -> str | None:
    """Why the project's architecture ``name`` cannot take square images of ``image_size`` px, in one line; or None."""
    if name == "lenet5" and image_size not in LENET_SIZES:
        return (f"lenet5 takes images of an even side from {LENET_SIZES[0]} to {LENET_SIZES[-1]} px (LeNet-5 sees "
                f"32 x 32, a smaller side padded to it), not {image_size} px: choose another model, e.g. cnn or resnet18")
    return None


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
def upsampling_plan(image_size: int) -> tuple[int, int]:
    """(start size, doublings) of a generator for square images of ``image_size``: two doublings from
    ``image_size / 4`` as DFAD's generator does (8 to 32 px), one more for each further halving while the start
    is above 8 px (64 px: 8 and 3; 224 px: 7 and 5), so the first linear layer stays small at any size. A size
    the doublings do not reach exactly is resized to at the end (bilinear)."""
    if image_size < 4:
        raise ValueError(f"generator needs an image size of at least 4, got {image_size}")
    ups = 2
    while -(-image_size // 2 ** ups) > 8:  # ceil(image_size / 2^ups)
        ups += 1
    return -(-image_size // 2 ** ups), ups


def _up_block(channels: int) -> nn.Sequential:
    """A further doubling stage of a generator beyond DFAD's two: upsample, conv, BN, LeakyReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels),
                         nn.LeakyReLU(0.2, inplace=True))


def _fit(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize the generator's output to the image size where its doublings overshoot it."""
    if x.shape[-1] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


class GeneratorA(nn.Module):
    """DFAD's generator: linear -> BN -> (upsample, conv, BN, LeakyReLU) x2 -> conv -> tanh -> BN; images above
    32 px get one more (upsample, conv, BN, LeakyReLU) stage per doubling (``upsampling_plan``)."""

    def __init__(self, latent_dim: int, base: int, channels: int, image_size: int):
        super().__init__()
        self.init_size, ups = upsampling_plan(image_size)
        self.image_size = image_size
        self.base = base
        self.project = nn.Linear(latent_dim, 2 * base * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(2 * base)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * base, 2 * base, 3, 1, 1), nn.BatchNorm2d(2 * base), nn.LeakyReLU(0.2, inplace=True)
        )
        # Stages beyond DFAD's two (none up to 32 px, so existing checkpoints load as they are).
        self.extra = nn.Sequential(*[_up_block(2 * base) for _ in range(ups - 2)])
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * base, base, 3, 1, 1), nn.BatchNorm2d(base), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(base, channels, 3, 1, 1), nn.Tanh(),
            # Without affine: the output is standardised, like normalised real images.
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, latent_dim)
        out = self.project(z).view(z.shape[0], 2 * self.base, self.init_size, self.init_size)  # (B, 2b, s, s)
        out = F.interpolate(self.bn0(out), scale_factor=2)  # (B, 2b, 2s, 2s)
        out = F.interpolate(self.block1(out), scale_factor=2)  # (B, 2b, 4s, 4s)
        out = self.extra(out)  # (B, 2b, s * 2^ups, ...)
        return _fit(self.block2(out), self.image_size)  # (B, C, H, W)


class GeneratorDeconv(nn.Module):
    """DCGAN-style: linear -> ConvTranspose (BN, ReLU) x2 -> conv -> tanh, N(0, 0.02) init."""

    def __init__(self, latent_dim: int, base: int, channels: int, image_size: int):
        super().__init__()
        self.init_size, ups = upsampling_plan(image_size)
        self.image_size = image_size
        self.base = base
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 4 * base * self.init_size ** 2, bias=False),
        )
        self.bn0 = nn.BatchNorm2d(4 * base)
        extra = []  # doublings beyond the two (images above 32 px), at the first stage's width
        for _ in range(ups - 2):
            extra += [nn.ConvTranspose2d(4 * base, 4 * base, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * base),
                      nn.ReLU(inplace=True)]
        self.body = nn.Sequential(
            nn.ReLU(inplace=True), *extra,
            nn.ConvTranspose2d(4 * base, 2 * base, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * base), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * base, base, 4, 2, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
            nn.Conv2d(base, channels, 3, 1, 1), nn.Tanh(),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, latent_dim)
        out = self.project(z).view(z.shape[0], 4 * self.base, self.init_size, self.init_size)
        return _fit(self.body(self.bn0(out)), self.image_size)  # (B, C, H, W)


class ConditionalGenerator(nn.Module):
    """G(z, y): a generator of the registry fed with the noise and a learned embedding of the class.

    AVKD's generator models q(x|y); ``forward(z, y)`` takes the class of every image.
    """

    def __init__(self, base: type[nn.Module], latent_dim: int, width: int, channels: int, image_size: int,
                 num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.body = base(2 * latent_dim, width, channels, image_size)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # z: (B, nz), y: (B,) int64
        return self.body(torch.cat([z, self.embed(y)], 1))  # (B, C, H, W)


class Discriminator(nn.Module):
    """D(x, y) -> a real-valued logit per image: three strided convolutions (spectral norm), global pooling,
    and a class projection (Miyato & Koyama 2018): ``linear(h) + <embed(y), h>``.

    AVKD trains it to output high values on generated (x, y) and low values on prior images.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.features = nn.Sequential(
            sn(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 3, 1, 1)), nn.LeakyReLU(0.2),
        )
        self.linear = sn(nn.Linear(4 * width, 1))
        self.embed = sn(nn.Embedding(num_classes, 4 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W), y: (B,)
        h = self.features(x).sum((2, 3))  # (B, 4w)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Registries: architectures as data over a few family builders (like timm's model_args)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """A classifier: its family's builder and the family's arguments.

    ``base`` is the channel count of the first stage at width 1.0: the grid a width multiplier (and
    so ``student_fraction``) moves on. ``None``: the architecture has no width multiplier.
    """
    family: Callable[..., nn.Module]  # builder(arch, num_classes, in_channels, image_size, width)
    base: int | None
    depths: tuple[int, ...] = ()  # ResNets: blocks per stage
    feature_layers: tuple[str, ...] = ()  # modules whose outputs feature alignment matches by default

    @property
    def widthable(self) -> bool:
        return self.base is not None


# Teachers and students share one table: any classifier may be either.
_STAGES = ("layer1", "layer2", "layer3", "layer4")  # the residual stages' outputs
CLASSIFIERS: dict[str, Arch] = {
    # CIFAR ResNet-34, 3x3 stem: 21,328,292 params at 100 classes
    "resnet34": Arch(cifar_resnet, 64, (3, 4, 6, 3), _STAGES),
    "resnet34_w": Arch(cifar_resnet, 64, (3, 4, 6, 3), _STAGES),  # the same, named for use at a width multiplier
    "resnet34_tv": Arch(torchvision_resnet34, None, (), _STAGES),  # torchvision's resnet34, 7x7 stem
    "resnet18": Arch(cifar_resnet, 64, (2, 2, 2, 2), _STAGES),  # CIFAR ResNet-18: 11,220,132 params at 100 classes
    "resnet18_half": Arch(cifar_resnet, 32, (2, 2, 2, 2), _STAGES),  # ResNet-18 at half width: ~2.8M params
    # small 3-conv CNN (digits, MNIST), about 94k params for digits; its conv blocks end at the ReLUs
    "cnn": Arch(small_cnn, 32, (), ("features.2", "features.5", "features.9")),
    # LeNet-5 as in DFAD's MNIST teacher; its conv blocks end at the pools and the last ReLU. Widths move on a grid
    # of 1/24 (not 1/6, its first stage's channels): its 120-channel convolution holds most of its parameters, and
    # 1/6 steps jump from 3% to 11% of a LeNet-5 teacher, past a 10% budget.
    "lenet5": Arch(lenet5, 24, (), ("features.2", "features.5", "features.7")),
}

GENERATORS: dict[str, type[nn.Module]] = {
    "dfad": GeneratorA,  # DFAD's published generator, GeneratorA
    "deconv": GeneratorDeconv,
}


MODEL_FORMS = "torchvision:NAME, timm:NAME, package.module:callable or (teacher only) a .pt2 program"


def build_classifier(name: str, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """A classifier by spec: a registered name, or a foreign model (``trainable.sources``), untrained."""
    if sources.is_foreign(name):
        return sources.build_foreign(name, num_classes, in_channels, image_size, width)
    if name not in CLASSIFIERS:
        raise ValueError(unknown(f"unknown model {name!r}", sorted(CLASSIFIERS), f"or name one as {MODEL_FORMS}"))
    arch = CLASSIFIERS[name]
    return arch.family(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)


def is_widthable(name: str) -> bool:
    """Whether ``student_fraction``/``student_width`` can size this family (a width multiplier exists)."""
    if sources.is_foreign(name):
        return sources.widthable(name)
    return name in CLASSIFIERS and CLASSIFIERS[name].widthable


def build_generator(name: str, latent_dim: int, base: int, channels: int, image_size: int,
                    num_classes: int = 0) -> nn.Module:
    """A generator of the registry; with ``num_classes`` a ``ConditionalGenerator`` G(z, y) around it."""
    cls = lookup(GENERATORS, "generator", name)
    if num_classes:
        return ConditionalGenerator(cls, latent_dim, base, channels, image_size, num_classes)
    return cls(latent_dim, base, channels, image_size)


def feature_layers(name: str, spec: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The layer names feature alignment hooks on a classifier: its defaults (``auto``) or a comma list.

    ``auto`` on a foreign model (``model`` given) finds its stages by their common names: ResNet-style
    ``layer1``..``layer4``, timm's ``stages.N``/``blocks.N``, or torchvision's ``features.N`` (MobileNet,
    EfficientNet, ConvNeXt, VGG), four of them evenly spread ending at the last.
    """
    if spec != "auto":
        return tuple(n.strip() for n in spec.split(",") if n.strip())
    if name in CLASSIFIERS:
        return CLASSIFIERS[name].feature_layers
    if model is None:
        return ()
    modules = dict(model.named_modules())
    if all(s in modules for s in _STAGES):
        return _STAGES
    for container in ("stages", "blocks", "features", "layers"):
        seq = modules.get(container)
        if isinstance(seq, nn.Sequential) and len(seq) >= 2:
            n = len(seq)
            picks = sorted({max(0, round(n * k / 4) - 1) for k in (1, 2, 3, 4)})
            return tuple(f"{container}.{i}" for i in picks)
    return ()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, channels: int, image_size: int) -> int:
    """Floating-point operations of one forward of one image (``torch.utils.flop_counter``; a multiply-add
    counts 2), in eval mode; the model's mode is put back."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, channels, image_size, image_size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def classifier_params(name: str, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return count_params(build_classifier(name, num_classes, in_channels, image_size, width))


def width_for_fraction(name: str, fraction: float, teacher_params: int, num_classes: int, in_channels: int,
                       image_size: int) -> float:
    """The width multiplier whose parameter count is closest to ``fraction * teacher_params``.

    Widths are searched on the architecture's integer channel grid (``Arch.base``) so that the
    returned width builds exactly the counted model.
    """
    if not is_widthable(name):
        raise ValueError(f"student {name!r} has no width; student_fraction needs one of "
                         f"{sorted(k for k, a in CLASSIFIERS.items() if a.widthable)} or a torchvision MobileNet/MNASNet "
                         "(torchvision:mobilenet_v3_small, ...) or a factory of your own that takes width_mult=; choose other "
                         "students by name")
    target = fraction * teacher_params
    if name not in CLASSIFIERS:  # a foreign width multiplier on a grid of 0.05 steps (their channels round to 8)
        grid = [round(0.05 * i, 2) for i in range(2, 61)]
        count = functools.cache(lambda w: classifier_params(name, num_classes, in_channels, image_size, w))
        lo, hi = 0, len(grid) - 1  # parameters grow with width: bisect for the first width at or over the target
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(grid[mid]) < target else (lo, mid)
        near = grid[max(0, lo - 1):lo + 1]
        return min(near, key=lambda w: abs(count(w) - target))
    base = CLASSIFIERS[name].base
    best_w, best_err = 1.0, float("inf")
    for channels in range(1, 8 * base + 1):
        w = channels / base
        err = abs(classifier_params(name, num_classes, in_channels, image_size, w) - target)
        if err < best_err:
            best_w, best_err = w, err
        elif err > best_err:  # parameter count grows with width: past the minimum
            break
    return best_w


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer (its input is the penultimate feature used by DAFL's activation loss)."""
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            head = m
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier head")
    return head
