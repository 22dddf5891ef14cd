"""Your own images: a folder task (``folder:PATH``, ImageFolder layout) and Tiny-ImageNet's official layout.

A folder task is a user's held-out labelled images, one sub-folder per class; ``PATH/task.yaml``
(optional) says what the folder cannot::

    classes: [cat, dog, ...]    # the teacher's output order (default: the sorted folder names); a count (classes: 10)
                                # or names without sub-folders: a task WITHOUT labels (its images, if any, unlabelled)
    mean: [0.485, 0.456, 0.406] # per channel, of the teacher's input normalisation (default: ImageNet's)
    std: [0.229, 0.224, 0.225]
    image_size: 96              # square side the teacher takes (default: the first image's side)
    channels: 3                 # 1 or 3 (default: the first image's mode)
    recipe: cifar100            # the config defaults of a shipped task (default: a ResNet-34 -> ResNet-18 DFAD recipe)

A task without labels selects on the student's agreement with the teacher (``trainable.proxy``): on its unlabelled
images when it has some, else on a frozen generator's.

Like the torchvision tasks, a data-free run reads these images only for evaluation (``trainable.tasks``
normalises them and splits them by seed into validation and test). Every problem is one ``UserError``
line. ``read_image`` is also how AVKD's ``folder:PATH`` priors are read.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from base.errors import UserError
from base.yamlfile import read_yaml, short
from trainable.models import LENET_SIZES
from trainable.tasklist import TASKS, Task

FOLDER = "folder:"
TASK_FILE = "task.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what folder tasks and folder priors read
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TASK_KEYS = ("classes", "mean", "std", "image_size", "channels", "recipe")


def is_folder_task(name: str) -> bool:
    return isinstance(name, str) and name.startswith(FOLDER)


def as_task_name(name: str | None) -> str | None:
    """A task from the command line as configs hold it: a folder task by its absolute path (trials run in folders
    of their own)."""
    if name and is_folder_task(name) and len(name) > len(FOLDER):
        return FOLDER + str(Path(name[len(FOLDER):]).expanduser().resolve())
    return name


HIDDEN = ("__MACOSX",)  # besides names starting with "." (.DS_Store, macOS's ._x.png, .ipynb_checkpoints/)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # an image over this (8192 x 8192) is refused before it is decoded
MAX_SIDE = 1024  # the largest square side a task's images are resized to


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (any depth), sorted; hidden files and folders skipped. A linked folder is
    followed once; a link back into a folder being walked is refused (a loop)."""
    return _walk(folder)[0]


def _walk(folder: Path) -> tuple[list[Path], int]:
    """``image_files(folder)``, and how many image files it skipped as hidden. Raises UserError."""
    found, hidden = [], 0
    real = Path(os.path.realpath(folder))
    stack = [(Path(folder), (str(real), *map(str, real.parents)))]  # a link to any of these is a loop
    while stack:
        here, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except (NotADirectoryError, FileNotFoundError):
            continue
        except OSError as e:
            raise UserError(f"cannot read folder {here} ({e.strerror}); check its permissions") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if is_hidden(entry.name):
                    hidden += len(_walk_quietly(path))
                    continue
                real = os.path.realpath(path)
                if real in ancestors:
                    raise UserError(f"{path} links back to {real}, a folder that holds it (a loop); remove the link")
                stack.append((path, (*ancestors, real)))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                if is_hidden(entry.name):
                    hidden += 1
                else:
                    found.append(path)
    return sorted(found), hidden


def _walk_quietly(folder: Path) -> list[Path]:
    """Image files under a hidden folder, for the count of what was skipped (links not followed)."""
    try:
        return [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError:
        return []


def _open_image(path: Path):
    """``PIL.Image.open`` (the header only), with Pillow's decompression-bomb warning and error refused by name.
    Raises UserError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"image {path} is a decompression bomb (far more pixels than its file size suggests); remove "
                        "it") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); remove it or replace it with a readable "
                        "image") from None


def read_image(path: Path, channels: int, side: int | None) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1], in the task's mode, resized to ``side`` x ``side`` (bilinear) when
    given; a large image is decoded at a reduced size where its format allows (JPEG's draft mode) and halved by box
    filtering before the resize. Raises UserError naming the file when it cannot be read or is too large (a
    decompression bomb: a few KB on disk that decode to gigabytes)."""
    try:
        with _open_image(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(f"image {path} is {w} x {h} pixels, over {MAX_IMAGE_PIXELS:,} (a decompression bomb, "
                                "or far larger than a task needs); remove it or resize it")
            mode = "L" if channels == 1 else "RGB"
            if side is not None:
                im.draft(mode, (side, side))  # JPEG: decoded at 1/2, 1/4 or 1/8 size, never below side
            im = im.convert(mode)
            if side is not None and min(im.size) // side >= 2:
                im = im.reduce(min(im.size) // side)  # box filter down to at least side, then the resize
            if side is not None and im.size != (side, side):
                im = im.resize((side, side), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # the pixels, once decoded
        raise UserError(f"cannot read image {path} ({type(e).__name__}); remove it or replace it with a readable "
                        "image") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


MAX_TASK_BYTES = 16 * 1024 ** 2  # a task.yaml is a few lines, or one name per class
MAX_TASK_VALUES = 400_000  # values once aliases are expanded: 100,000 class names and room to spare


def _task_yaml(root: Path) -> dict[str, Any]:
    """``task.yaml`` read by the reader of space files (data only, bounded, no key twice), or {} when absent."""
    path = root / TASK_FILE
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist; fix the link or remove it")
    if not path.exists():
        return {}
    raw = read_yaml(path, MAX_TASK_BYTES, f"a {TASK_FILE}", max_values=MAX_TASK_VALUES) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of {list(TASK_KEYS)}")
    unknown = sorted(str(k) for k in raw if k not in TASK_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys are {list(TASK_KEYS)}")
    return raw


def _numbers(raw: dict, key: str, n: int, path: Path) -> tuple[float, ...] | None:
    v = raw.get(key)
    if v is None:
        return None
    v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if (not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          and math.isfinite(x) for x in v)
            or (key == "std" and not all(x > 0 for x in v))):
        raise UserError(f"{path / TASK_FILE}: {key} must be {n} finite number(s){' > 0' if key == 'std' else ''} (one "
                        f"per channel), got {short(v)}")
    return tuple(float(x) for x in v)


def folder_task(root_text: str):
    """The ``Task`` of a folder of images (see the module docstring): labelled, one sub-folder per class, or without
    labels (``classes`` in task.yaml and no class sub-folders). Raises UserError."""
    root = Path(root_text)
    if not root.is_dir():
        raise UserError(f"task folder:{root} is not a folder; pass folder:PATH of held-out images in ImageFolder "
                        "layout (one sub-folder per class), or a folder with a task.yaml naming the class count")
    raw = _task_yaml(root)
    try:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
    except OSError as e:
        raise UserError(f"cannot read task folder {root} ({e.strerror}); check its permissions") from None
    classes, labelled = _folder_classes(root, raw, folders)
    channels, side = raw.get("channels"), raw.get("image_size")
    if channels is not None and (type(channels) is not int or channels not in (1, 3)):
        raise UserError(f"{root / TASK_FILE}: channels must be 1 or 3 (a whole number), got {short(channels)}")
    if side is not None and (type(side) is not int or not 4 <= side <= MAX_SIDE):
        raise UserError(f"{root / TASK_FILE}: image_size must be a whole number of pixels in [4, {MAX_SIDE}], got "
                        f"{short(side)}")
    if channels is None or side is None:  # read off the first image
        channels, side = _first_image_shape(root, classes if labelled else None, channels, side)
    mean = _numbers(raw, "mean", channels, root)
    std = _numbers(raw, "std", channels, root)
    notes = []
    if mean is None or std is None:
        mean = mean or (IMAGENET_MEAN if channels == 3 else (0.5,))
        std = std or (IMAGENET_STD if channels == 3 else (0.5,))
        notes.append(f"normalising with {'ImageNet' if channels == 3 else 'mean 0.5, std 0.5'}'s statistics (set mean "
                     f"and std in {root / TASK_FILE} to the teacher's own)")
    found, hidden = _walk(root)
    if hidden:
        notes.append(f"skipped {hidden} hidden image file(s) in {root} (names starting with '.', __MACOSX, "
                     ".ipynb_checkpoints)")
    if not labelled:
        n = len(found)
        notes.append(f"{root} has no labels: runs select on agreement with the teacher (on "
                     + (f"its {n} unlabelled images)" if n else "a frozen generator's images; the folder holds none)")
                     + "; no accuracy is measured")
    if raw.get("recipe") is not None:
        defaults = _recipe(root, raw["recipe"])
    else:
        recipe, defaults, why = sized_recipe(side, channels)
        notes.append(f"{root / TASK_FILE} names no recipe: {why} take the {recipe} recipe ({defaults['epochs']} epochs "
                     f"of {defaults['iters_per_epoch']} iterations at batch {defaults['batch_size']}); set recipe: in "
                     "it to choose another")
    return Task(FOLDER + str(root), len(classes), channels, side, mean, std, defaults["teacher"], defaults,
                f"your images in {root}", classes=tuple(classes), notes=tuple(notes), labelled=labelled)


def _recipe(root: Path, name: Any) -> dict[str, Any]:
    """The config defaults of a folder task named by ``recipe: NAME``: a shipped task's."""
    if not isinstance(name, str) or name not in TASKS:
        raise UserError(f"{root / TASK_FILE}: recipe must name a shipped task, one of {sorted(TASKS)}; got {short(name)}")
    return dict(TASKS[name].defaults)


def sized_recipe(side: int, channels: int) -> tuple[str, dict[str, Any], str]:
    """The recipe of a folder task whose task.yaml names none, from the images' size: (its name, its defaults, why).

    Small images (up to 16 px, or grayscale up to 32 px: digits-, MNIST-like) take the small digits recipe (30 epochs
    of 20 iterations at batch 96, a small generator), grey ones of an even side from 16 to 32 px with MNIST's student
    and terms (``MNIST_SIZED``), colour images up to 64 px DFAD's CIFAR recipe (500 x 50 at batch 256), larger ones
    DFAD's loop at batch 64 for 200 epochs (``FOLDER_DEFAULTS``)."""
    if channels == 1 and side in LENET_SIZES:
        return ("MNIST-sized digits", {**TASKS["digits"].defaults, **MNIST_SIZED},
                f"MNIST-sized grey images ({side} px)")
    if side <= 16 or (channels == 1 and side <= 32):
        return "digits", dict(TASKS["digits"].defaults), f"small images ({side} px, {channels} channel(s))"
    if side <= 64:
        return "cifar100", {**TASKS["cifar100"].defaults, "prior": "photos"}, f"CIFAR-sized colour images ({side} px)"
    return "folder", dict(FOLDER_DEFAULTS), f"large images ({side} px)"


def _folder_classes(root: Path, raw: dict, folders: list[str]) -> tuple[list[str], bool]:
    """The class names in the teacher's order, and whether the folder labels its images (one sub-folder per class).

    ``classes: N`` (a count), or a list of names none of which is a sub-folder, makes a task without labels."""
    classes = raw.get("classes")
    if isinstance(classes, int) and not isinstance(classes, bool):
        if not 2 <= classes <= 100_000:
            raise UserError(f"{root / TASK_FILE}: classes must be the teacher's class count (>= 2) or a list of names, "
                            f"got {classes}")
        return [str(i) for i in range(classes)], False
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                    for c in classes):
            raise UserError(f"{root / TASK_FILE}: classes must be a list of the class folders' names, or the class "
                            "count of a task without labels")
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise UserError(f"{root / TASK_FILE}: classes lists a name twice")
        if len(classes) >= 2 and not set(classes) & set(folders):
            return classes, False  # no class has a folder: the images, if any, are unlabelled
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        if missing or extra:
            raise UserError(f"{root / TASK_FILE} lists {len(classes)} classes but the folder has {len(folders)} class "
                            f"folders (listed without a folder: {missing[:5]}; folders not listed: {extra[:5]}); "
                            "make them agree")
    else:
        classes = folders
    if len(classes) < 2:
        raise UserError(f"task folder:{root} has {len(classes)} class folder(s); it needs at least 2 (one sub-folder "
                        f"of images per class), or, without labels, classes: N (the teacher's class count) in "
                        f"{root / TASK_FILE}")
    empty = [c for c in classes if not image_files(root / c)]
    if empty:
        raise UserError(f"task folder:{root}: class folder {empty[0]!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes, True


def _first_image_shape(root: Path, classes: list[str] | None, channels: int | None,
                       side: int | None) -> tuple[int, int]:
    """(channels, side) where task.yaml leaves them out: read off the task's first image."""
    found = image_files(root / classes[0]) if classes else image_files(root)
    if not found:
        raise UserError(f"{root / TASK_FILE}: give channels and image_size (the folder has no image to read them "
                        "off)")
    with _open_image(found[0]) as im:
        mode, size = im.mode, im.size
    if side is None and not 4 <= size[0] <= MAX_SIDE:
        raise UserError(f"{root / TASK_FILE}: give image_size, the side the teacher takes (the first image, {found[0]}, "
                        f"is {size[0]} pixels wide, outside [4, {MAX_SIDE}])")
    return channels or (1 if mode in ("L", "1", "I", "I;16", "F") else 3), side or size[0]


# The small recipe at MNIST's sizes (grey, an even side from 16 to 32 px): a LeNet-5 student without BatchNorm, KL for
# both players and the student's gradient clipped, and a stronger BatchNorm-statistics term (dropped for a teacher
# without BatchNorm, trainable/fitting.py). On a LeNet-5 teacher with BatchNorm at 32 px (bench/bnfree_teacher.py
# --teacher-form bn-code), the digits recipe's BatchNorm CNN student stayed at chance over a whole default search
# (0.097 held out); one run of 20 epochs with this recipe reached 0.941 (0.894 at w_bn 0.1, 0.183 without w_bn).
MNIST_SIZED = dict(student="lenet5", student_loss="kl", generator_loss="neg_kl", student_grad_clip=1.0, w_bn=1.0)

# A recipe for your own images: DFAD's loop at a batch a CPU or GPU of any size can take; name the teacher
# (--teacher-model) and pass its weights.
FOLDER_DEFAULTS = dict(
    teacher="resnet34", student="resnet18", student_fraction=None, generator="dfad", latent_dim=256,
    generator_width=64, epochs=200, iters_per_epoch=50, batch_size=64, n_student=5, n_generator=1,
    lr_student=0.1, lr_generator=1e-3, scheduler="cosine", prior="photos",
)


def load_unlabelled(task) -> torch.Tensor:
    """Every image of a folder task without labels (any depth) in [0, 1], (N, C, H, W); N may be 0."""
    files = image_files(Path(task.name[len(FOLDER):]))
    if not files:
        return torch.zeros(0, task.channels, task.image_size, task.image_size)
    return torch.from_numpy(np.stack([read_image(f, task.channels, task.image_size) for f in files]))


def load_folder(task) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a folder task in [0, 1], (N, C, H, W), and their labels (N,)."""
    root = Path(task.name[len(FOLDER):])
    xs, ys = [], []
    for label, cls in enumerate(task.classes):
        for f in image_files(root / cls):
            xs.append(read_image(f, task.channels, task.image_size))
            ys.append(label)
    if len(ys) < 2:
        raise UserError(f"task {task.name} has {len(ys)} image(s); it needs at least 2 (validation and test)")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet (64 x 64, 200 classes), its official on-disk layout
# ---------------------------------------------------------------------------------------------
TINY_FOLDER = "tiny-imagenet-200"


def _tiny_root(data_root: str | None) -> Path:
    if data_root is None:
        raise UserError("task tinyimagenet needs its data: pass --data-root DIR holding tiny-imagenet-200/ (the "
                        "official archive, unpacked)")
    root = Path(data_root) / TINY_FOLDER
    if not (root / "wnids.txt").is_file():
        raise UserError(f"tinyimagenet data not found: {root / 'wnids.txt'} is missing; pass --data-root to the folder "
                        f"that holds {TINY_FOLDER}/")
    return root


def tiny_classes(root: Path, count: int) -> list[str]:
    """The task's ``count`` (200) WordNet ids in the order the teacher's outputs follow (sorted, as ImageFolder
    orders train/). Raises UserError where ``wnids.txt`` does not list ``count`` distinct ids."""
    path = root / "wnids.txt"
    try:
        ids = [w for w in path.read_text(encoding="utf-8", errors="replace").split() if w]
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if len(ids) != count or len(set(ids)) != len(ids):
        raise UserError(f"{path} lists {len(ids)} ids ({len(set(ids))} distinct); Tiny-ImageNet has {count}, one per "
                        "class: unpack the official archive again")
    return sorted(ids)


def load_tiny_val(task, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet's official ``val/`` split (val_annotations.txt): images in [0, 1] and labels."""
    root = _tiny_root(data_root)
    index = {w: i for i, w in enumerate(tiny_classes(root, task.num_classes))}
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"tinyimagenet data incomplete: {ann} is missing; unpack the official archive again")
    rows = [line.split("\t") for line in ann.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    unknown = [r for r in rows if len(r) < 2 or r[1] not in index]
    if unknown:
        raise UserError(f"tinyimagenet: {len(unknown)} of the {len(rows)} lines of {ann} name no class of wnids.txt "
                        f"(the first: {short(chr(9).join(unknown[0]), 60)}); unpack the official archive again")
    xs, ys = [], []
    for parts in rows:
        xs.append(read_image(root / "val" / "images" / parts[0], task.channels, task.image_size))
        ys.append(index[parts[1]])
    if len(ys) < 2:
        raise UserError(f"tinyimagenet: {ann} names fewer than 2 readable images; unpack the official archive again")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


def load_tiny_train(task, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet's ``train/<wnid>/images/`` in [0, 1] (the teacher's training data; never read by a data-free
    run)."""
    root = _tiny_root(data_root)
    xs, ys = [], []
    for label, wnid in enumerate(tiny_classes(root, task.num_classes)):
        for f in image_files(root / "train" / wnid):
            xs.append(read_image(f, task.channels, task.image_size))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)
