"""Prior data for AVKD: unlabeled images from a related domain that is *not* the teacher's training set.

AVKD's discriminator learns to tell generated images from prior images, which keeps the generator
near natural-looking inputs (Tang & Lin, "Adversarial Variational Knowledge Distillation"). A
``prior`` setting names where they come from:

- ``letters``: Latin letters rendered with Pillow's bundled font at random sizes, positions and
  angles (white on black, like the digits' ink). Letters that look like digits (O, I, l, S, Z, B, ...)
  are left out. Embedded: needs no network or files; the default of ``digits`` and ``mnist``.
- ``photos``: random patches of scikit-learn's two bundled sample photographs. Embedded.
- ``cifar10``, ``cifar100``: the *training* split of the other CIFAR (the paper's pairings: CIFAR-100
  for a CIFAR-10 teacher, CIFAR-10 for a CIFAR-100 teacher), read with torchvision from the data root.
- ``cifar90``: CIFAR-100 without its two vehicle superclasses (10 classes), the paper's prior for a
  CIFAR-10 teacher that shares no vehicle classes with it.
- ``folder:PATH``: every image under PATH (png, jpg, bmp, gif, webp), resized.

Whatever the source, images are converted to the task's channels and size and pass through the
teacher's own input normalisation. A prior that is the teacher's dataset is refused
(:func:`check_prior`): reading the teacher's training data would break the data-free guarantee.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from base.errors import UserError, unknown
from trainable.images import IMAGE_SUFFIXES, image_files, read_image
from trainable.tasks import Task, kept, normalise

EMBEDDED = ("letters", "photos")
CIFAR_PRIORS = ("cifar10", "cifar100", "cifar90")
FOLDER = "folder:"
PRIOR_SIZE = 4096  # images of an embedded prior
MAX_FOLDER_IMAGES = 50_000
# CIFAR-100 fine classes of the superclasses vehicles 1 (bicycle, bus, motorcycle, pickup truck,
# train) and vehicles 2 (lawn mower, rocket, streetcar, tank, tractor), left out of cifar90.
CIFAR100_VEHICLES = (8, 13, 48, 58, 90, 41, 69, 81, 85, 89)
# Letters that a digit classifier would read as a digit: 0/O/o/D/Q, 1/I/l/i/j, 2/Z/z, 5/S/s, 6/b/G, 8/B, 9/g/q, 4/A/y, 7/T.
DIGIT_LIKE = set("OoDQIlijZzSsbGBgqAyT")
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in DIGIT_LIKE)
# The datasets each task's teacher was trained on, as prior names; refused as its prior.
OWN_DATA = {"digits": (), "mnist": ("mnist",), "cifar10": ("cifar10",), "cifar100": ("cifar100", "cifar90")}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def prior_names() -> list[str]:
    return [*EMBEDDED, *CIFAR_PRIORS, f"{FOLDER}PATH"]


def check_prior(prior: str, task: Task) -> str | None:
    """Why ``prior`` cannot serve a run of ``task`` (one line), or None when it can."""
    task_name = task.name
    if not isinstance(prior, str) or not (prior in EMBEDDED or prior in CIFAR_PRIORS or
                                          (prior.startswith(FOLDER) and len(prior) > len(FOLDER))):
        return unknown(f"prior: unknown {prior!r}", prior_names())
    if prior in OWN_DATA.get(task_name, ()):
        return (f"prior: {prior} is the {task_name} teacher's own dataset, which a data-free run may not read; "
                f"choose another (e.g. {'cifar10' if task_name == 'cifar100' else 'cifar100'} or folder:PATH)")
    return None


def folder_prior_problem(prior: str) -> str | None:
    """Why a ``folder:PATH`` prior cannot be read (not a folder, no image files), in one line; None otherwise. Checked
    with every config, AVKD or not, so that a wrong folder is found before the method that reads it is chosen."""
    if not (isinstance(prior, str) and prior.startswith(FOLDER) and len(prior) > len(FOLDER)):
        return None
    path = Path(prior[len(FOLDER):]).expanduser()
    if not path.is_dir():
        return f"prior: folder:{path} is not a folder; pass folder:PATH of a folder of images"
    if not image_files(path):
        return f"prior: folder:{path} holds no readable images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images"
    return None


def load_prior(prior: str, task: Task, data_root: str | None = None, seed: int = 0,
               download: bool = False) -> torch.Tensor:
    """The prior images for a task: (N, C, H, W) float32, normalised like the teacher's inputs, on the CPU. Read
    once per process for each prior and task shape (an actor runs several trials), a copy returned."""
    problem = check_prior(prior, task)
    if problem:
        raise UserError(problem)
    key = (prior, task.name, task.channels, task.image_size, task.mean, task.std, data_root, seed, download)
    return kept(_LOADED, key, lambda: _load(prior, task, data_root, seed, download)).clone()


_LOADED: dict[tuple, torch.Tensor] = {}  # the priors read in this process (trainable.tasks.kept)


def _load(prior: str, task: Task, data_root: str | None, seed: int, download: bool) -> torch.Tensor:
    if prior == "letters":
        x = _letters(seed)
    elif prior == "photos":
        x = _photos(seed)
    elif prior in CIFAR_PRIORS:
        x = _cifar(prior, data_root, download)
    else:
        x = _folder(Path(prior[len(FOLDER):]).expanduser(), task, data_root)
    return normalise(_fit(x, task), task).contiguous()


def _fit(x: torch.Tensor, task: Task) -> torch.Tensor:
    """Images in [0, 1], (N, c, h, w), to the task's channels and size."""
    if x.shape[1] == 3 and task.channels == 1:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif x.shape[1] == 1 and task.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != task.image_size or x.shape[-2] != task.image_size:
        x = F.interpolate(x, size=(task.image_size, task.image_size), mode="area" if x.shape[-1] > task.image_size
                          else "bilinear")
    return x.clamp(0, 1)


def _letters(seed: int, n: int = PRIOR_SIZE, canvas: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, canvas, canvas), dtype=np.float32)
    fonts = {s: ImageFont.load_default(size=s) for s in range(22, 37, 2)}  # letters fill the frame, like digits
    for i in range(n):
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        size = int(rng.choice(list(fonts)))
        ch = LETTERS[rng.integers(len(LETTERS))]
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=fonts[size])
        w, h = right - left, bottom - top
        x0 = (canvas - w) / 2 - left + rng.normal(0, 2)
        y0 = (canvas - h) / 2 - top + rng.normal(0, 2)
        draw.text((x0, y0), ch, fill=255, font=fonts[size], stroke_width=int(rng.integers(1, 3)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        out[i, 0] = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(out)


def _photos(seed: int, n: int = PRIOR_SIZE, patch: int = 32) -> torch.Tensor:
    from sklearn.datasets import load_sample_images  # noqa: PLC0415 - scikit-learn takes a second to import; only the digits task and the photos prior need it

    rng = np.random.default_rng(seed)
    photos = [torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).float() / 255.0
              for im in load_sample_images().images]  # (3, 427, 640) each
    out = torch.empty(n, 3, patch, patch)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        side = int(rng.integers(16, 129))
        top, left = int(rng.integers(0, p.shape[1] - side)), int(rng.integers(0, p.shape[2] - side))
        crop = p[:, top:top + side, left:left + side].unsqueeze(0)
        out[i] = F.interpolate(crop, size=(patch, patch), mode="area" if side > patch else "bilinear")[0]
    return out


def _cifar(prior: str, data_root: str | None, download: bool) -> torch.Tensor:
    import torchvision.datasets as tvd  # noqa: PLC0415 - torchvision takes a second to import; only its models, datasets and image writer need it

    if data_root is None:
        raise UserError(f"prior {prior} needs its data: pass --data-root DIR holding it (downloaded there when "
                        "online with --download)")
    cls = tvd.CIFAR10 if prior == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(root=data_root, train=True, download=download)
    except RuntimeError as e:
        raise UserError(f"prior {prior}: data not found or corrupted under {data_root}: {e}; pass --data-root to a "
                        "folder holding it, or --download when online") from e
    data, targets = np.asarray(ds.data), np.asarray(ds.targets)  # (N, 32, 32, 3) uint8
    if prior == "cifar90":
        data = data[~np.isin(targets, CIFAR100_VEHICLES)]
    return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2))).float().div_(255.0)


def _folder(path: Path, task: Task, data_root: str | None) -> torch.Tensor:
    if not path.is_dir():
        raise UserError(f"prior folder:{path} is not a folder; pass folder:PATH of a folder of images")
    own = TORCHVISION_FOLDERS.get(task.name)
    if own and data_root and path.resolve().is_relative_to((Path(data_root) / own).resolve()):
        raise UserError(f"prior folder:{path} lies inside the {task.name} teacher's own dataset; a data-free run "
                        "may not read it: pass a folder of other images")
    out = []
    for f in image_files(path)[:MAX_FOLDER_IMAGES]:
        try:
            out.append(read_image(f, task.channels, task.image_size))
        except UserError:
            continue  # not an image after all: skipped
    if not out:
        raise UserError(f"prior folder:{path} holds no readable images ({', '.join(IMAGE_SUFFIXES)}); pass a folder "
                        "of images")
    return torch.from_numpy(np.stack(out))
