"""Your own images as the task (folder:PATH, ImageFolder layout), Tiny-ImageNet's layout, generators at any size."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from base.errors import UserError
from conftest import bounded, run_main
from trainable.config import build_config
from trainable.images import as_task_name, folder_task
from trainable.models import build_generator, upsampling_plan
from trainable.tasks import get_task, load_eval_data, load_teacher_train


def write_folder(root, classes=("ant", "bee", "cat"), n=5, size=16, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def task_of(root):
    return get_task(as_task_name(f"folder:{root}"))


@pytest.mark.parametrize("size", [8, 16, 28, 32, 64, 96, 224])
@pytest.mark.parametrize("name", ["dfad", "deconv"])
def test_generators_make_images_of_any_size(name, size):
    g = build_generator(name, 16, 8, 3, size)
    x = g(torch.randn(2, 16))
    assert x.shape == (2, 3, size, size) and torch.isfinite(x).all()
    start, ups = upsampling_plan(size)
    assert start <= 8 or ups == 2


def test_generators_up_to_32_px_keep_dfads_layout():
    # Checkpoints written before other sizes existed load as they are.
    g = build_generator("dfad", 64, 32, 1, 8)
    assert not any(k.startswith("extra") for k in g.state_dict())
    assert upsampling_plan(32) == (8, 2) and upsampling_plan(224) == (7, 5)
    assert build_generator("dfad", 16, 8, 3, 30)(torch.randn(2, 16)).shape[-1] == 30  # not a multiple of 4: resized


def test_a_folder_without_task_yaml_reads_its_classes_size_and_mode(tmp_path):
    write_folder(tmp_path / "imgs", size=20, mode="L")
    task = task_of(tmp_path / "imgs")
    assert (task.num_classes, task.channels, task.image_size, task.classes) == (3, 1, 20, ("ant", "bee", "cat"))
    assert task.mean == (0.5,) and any("normalising" in n for n in task.notes)
    data = load_eval_data(task, seed=0, val_fraction=0.2)
    assert len(data.val_y) + len(data.test_y) == 15 and len(data.val_y) == 3
    assert data.val_x.shape[1:] == (1, 20, 20)
    other = load_eval_data(task, seed=1, val_fraction=0.2)
    assert not torch.equal(data.val_y, other.val_y) or not torch.equal(data.val_x, other.val_x)
    cfg = build_config({"task": task.name, "teacher": "cnn", "student": "cnn", "student_width": 0.5})
    assert cfg.task == task.name


def test_task_yaml_sets_the_class_order_size_and_normalisation(tmp_path):
    root = write_folder(tmp_path / "imgs", size=24)
    (root / "task.yaml").write_text("classes: [cat, ant, bee]\nmean: [0.4, 0.4, 0.4]\nstd: [0.2, 0.2, 0.2]\n"
                                    "image_size: 16\nchannels: 3\n")
    task = task_of(root)
    assert task.classes == ("cat", "ant", "bee") and task.image_size == 16
    assert len(task.notes) == 1 and "names no recipe: small images (16 px, 3 channel(s)) take the digits recipe" in task.notes[0]
    data = load_eval_data(task, seed=0, val_fraction=0.5)
    assert data.test_x.shape[1:] == (3, 16, 16)
    x = np.asarray(Image.open(root / "cat" / "0.png").convert("RGB").resize((16, 16), Image.BILINEAR),
                   dtype=np.float32) / 255.0
    want = (torch.from_numpy(x.transpose(2, 0, 1)) - 0.4) / 0.2  # class "cat" is label 0 now
    both_x, both_y = torch.cat([data.val_x, data.test_x]), torch.cat([data.val_y, data.test_y])
    assert any(torch.allclose(xi, want, atol=1e-5) for xi in both_x[both_y == 0])


@pytest.mark.parametrize("setup, message", [
    (lambda r: write_folder(r, classes=("only",)), "it needs at least 2"),
    (lambda r: (write_folder(r), (r / "bee" / "3.png").write_bytes(b"garbage")), "cannot read image .*bee/3.png"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("classes: [ant, bee]\n")), "lists 2 classes but the folder has 3"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("colour: red\n")), r"unknown key\(s\) \['colour'\]"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("mean: [0.5]\n")), "mean must be 3 finite number"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("std: [0, 1, 1]\n")), "std must be 3 finite number"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("channels: 2\n")), "channels must be 1 or 3"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("image_size: 2\n")), "image_size must be"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("[1, 2\n")), "task.yaml: not valid YAML at line 2"),
    (lambda r: (write_folder(r), (r / "cat" / "x").mkdir(), [p.unlink() for p in (r / "cat").glob("*.png")]),
     "class folder 'cat' holds no images"),
    (lambda r: None, "is not a folder"),
])
def test_a_bad_folder_is_one_line(tmp_path, setup, message):
    root = tmp_path / "imgs"
    setup(root)
    with pytest.raises(UserError, match=message) as e:
        load_eval_data(get_task(as_task_name(f"folder:{root}")))
    assert "\n" not in str(e.value)


def test_a_folder_task_has_no_teacher_training_data(tmp_path):
    task = task_of(write_folder(tmp_path / "imgs"))
    with pytest.raises(UserError, match="held-out images only"):
        load_teacher_train(task)


def test_run_akd_refuses_a_teacher_whose_classes_differ_from_the_folders(tmp_path):
    import torchvision

    root = write_folder(tmp_path / "imgs", size=32)
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r18.pt")
    r = run_main("trainable/run_akd.py", "--task", f"folder:{root}", "--teacher-model", "torchvision:resnet18",
                 "--teacher", tmp_path / "r18.pt", "--out", tmp_path / "out")
    assert r.returncode == 2 and "checkpoint has 5 output classes" in r.stderr and "needs 3" in r.stderr
    assert not (tmp_path / "out").exists()


def write_tiny_imagenet(root, per_class=2, classes=3, seed=0):
    """tiny-imagenet-200/ as in the official archive: wnids.txt, train/<wnid>/images/*.JPEG, val/images + annotations."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order is not the class order
    lines = []
    (base / "val" / "images").mkdir(parents=True)
    for c in range(classes):
        (base / "train" / wnids[c] / "images").mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            img.save(base / "train" / wnids[c] / "images" / f"{wnids[c]}_{i}.JPEG", format="JPEG")
            name = f"val_{c * per_class + i}.JPEG"
            img.save(base / "val" / "images" / name, format="JPEG")
            lines.append(f"{name}\t{wnids[c]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tinyimagenet_reads_its_official_layout(tmp_path):
    write_tiny_imagenet(tmp_path)
    task = get_task("tinyimagenet")
    assert (task.num_classes, task.channels, task.image_size) == (200, 3, 64)
    data = load_eval_data(get_task("tinyimagenet"), seed=0, val_fraction=0.5, data_root=str(tmp_path))
    assert data.val_x.shape[1:] == (3, 64, 64) and len(data.val_y) + len(data.test_y) == 6
    assert set(torch.cat([data.val_y, data.test_y]).tolist()) == {0, 1, 2}  # sorted wnids
    x, y = load_teacher_train(get_task("tinyimagenet"), data_root=str(tmp_path))
    assert x.shape == (6, 3, 64, 64) and y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UserError, match="wnids.txt is missing"):
        load_eval_data(get_task("tinyimagenet"), data_root=str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_one_run_with_a_torchvision_teacher_and_student_on_a_folder_and_one_on_tinyimagenet(tmp_path):
    import torchvision

    from trainable.models import build_classifier

    root = write_folder(tmp_path / "imgs", size=32, n=4)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    fast = ["--set", "epochs=1", "--set", "iters_per_epoch=1", "--set", "batch_size=4", "--set", "precision=fp32",
            "--set", "channels_last=false"]
    r = run_main("trainable/run_akd.py", "--task", f"folder:{root}", "--teacher-model", "torchvision:resnet18",
                 "--teacher", tmp_path / "r18.pt", "--set", "student=torchvision:mobilenet_v3_small", *fast,
                 "--out", tmp_path / "tv")
    assert r.returncode == 0, r.stderr
    assert "normalising with ImageNet" in r.stdout and (tmp_path / "tv" / "student.pt2").is_file()
    write_tiny_imagenet(tmp_path / "data")
    torch.save(build_classifier("resnet34", 200, 3, 64).state_dict(), tmp_path / "r34.pt")
    r = run_main("trainable/run_akd.py", "--task", "tinyimagenet", "--data-root", tmp_path / "data", "--teacher",
                 tmp_path / "r34.pt", "--set", "student=resnet18_half", "--set", "student_width=0.125", *fast,
                 "--out", tmp_path / "tiny")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny" / "final.json").is_file()


def png_header_only(path, width, height):
    """A PNG file that declares width x height pixels and holds none: a decompression bomb's header, 60 bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


BOMB = "\n".join([f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("task_yaml, message", [
    ("channels: true\n", "channels must be 1 or 3 .a whole number., got True"),
    ("channels: 1.0\n", "channels must be 1 or 3 .a whole number., got 1.0"),
    ("image_size: 32.0\n", "image_size must be a whole number"),
    ("recipe: [x]\n", "recipe must name a shipped task"),
    ("mean: [.nan, 0.5, 0.5]\n", "mean must be 3 finite number"),
    ("std: [.inf, 1, 1]\n", "std must be 3 finite number"),
    ("mean: .nan\nchannels: 1\n", "mean must be 1 finite number"),
    ("classes: [ant, bee, true]\n", "classes must be a list"),
    ("channels: 3\nchannels: 1\n", "key 'channels' appears twice at line 2"),
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + BOMB + "\nmean: *i\n", "too large once its aliases are expanded"),
    ("mean: " + "[" * 50000 + "]" * 50000 + "\n", "nested"),
], ids=["channels true", "channels 1.0", "image_size float", "recipe list", "mean nan", "std inf", "mean nan scalar",
        "class bool", "duplicate key", "alias bomb", "deep"])
def test_task_yaml_is_read_like_a_space_file_with_exact_types(tmp_path, task_yaml, message):

    root = write_folder(tmp_path / "imgs")
    (root / "task.yaml").write_text(task_yaml)
    with bounded(120), pytest.raises(UserError, match=message) as e:  # a bomb is refused while counted, not expanded
        load_eval_data(get_task(as_task_name(f"folder:{root}")))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_nan_mean_on_the_command_line_is_exit_2_not_a_run_on_nan_images(tmp_path):
    root = write_folder(tmp_path / "imgs", size=8, mode="L")
    (root / "task.yaml").write_text("mean: [.nan]\nstd: [0.5]\n")
    r = run_main("trainable/run_akd.py", "--task", f"folder:{root}", "--teacher-model", "cnn", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "finite" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setup, message", [
    (lambda r: png_header_only(r / "bee" / "2.png", 20000, 20000), r"image .*bee/2.png is a decompression bomb"),
    (lambda r: png_header_only(r / "bee" / "2.png", 9000, 9000), r"image .*bee/2.png is 9000 x 9000 pixels, over"),
    (lambda r: (r / "task.yaml").mkdir(), r"task.yaml: a task.yaml must be a regular file, and this is a folder"),
    (lambda r: (r / "cat" / "loop").symlink_to(r), r"cat/loop links back to .*imgs, a folder that holds it .a loop."),
    (lambda r: (r / "loop").symlink_to(r), r"loop links back to .*imgs, a folder that holds it .a loop."),
], ids=["20000x20000 png", "9000x9000 png", "task.yaml unreadable", "loop in a class", "loop as a class"])
def test_images_and_folders_that_cannot_be_read_are_refused_by_name(tmp_path, setup, message):
    root = write_folder(tmp_path / "imgs")
    setup(root)
    with pytest.raises(UserError, match=message) as e:
        load_eval_data(get_task(as_task_name(f"folder:{root}")))
    assert "\n" not in str(e.value)


def test_an_unreadable_folder_is_one_line(tmp_path, monkeypatch):
    import os

    from trainable import images

    root = write_folder(tmp_path / "imgs")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images.os, "scandir", denied)  # as root, chmod cannot deny a read: the OS's answer, faked
    with pytest.raises(UserError, match=r"cannot read folder .*imgs.* \(Permission denied\)"):
        images.image_files(root)
    monkeypatch.undo()
    monkeypatch.setattr(type(root), "iterdir", denied)
    with pytest.raises(UserError, match=r"cannot read task folder .*imgs \(Permission denied\)"):
        folder_task(str(root))
    assert os.path.isdir(root)


def test_hidden_files_and_folders_are_skipped_with_a_note_and_a_linked_class_is_followed(tmp_path):
    root = write_folder(tmp_path / "imgs", classes=("ant", "bee"))
    (root / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # not an image
    (root / "bee" / ".ipynb_checkpoints").mkdir()
    (root / "bee" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"not an image either")
    (root / "__MACOSX" / "ant").mkdir(parents=True)
    (root / "__MACOSX" / "ant" / "._1.png").write_bytes(b"junk")
    elsewhere = write_folder(tmp_path / "more", classes=("cat",), n=3)
    (root / "cat").symlink_to(elsewhere / "cat")  # a class folder that is a link: followed once
    task = task_of(root)
    assert task.classes == ("ant", "bee", "cat")
    assert any("skipped 3 hidden image file(s)" in n for n in task.notes)
    data = load_eval_data(task, seed=0, val_fraction=0.5)
    assert len(data.val_y) + len(data.test_y) == 13


def test_a_large_image_is_decoded_reduced_and_matches_a_full_decode(tmp_path):
    from trainable.images import read_image

    ramp = np.linspace(0, 255, 2048)  # a smooth 2048 x 2048 image: any fair downscale of it agrees
    big = np.stack([ramp[None, :].repeat(2048, 0), ramp[:, None].repeat(2048, 1), np.full((2048, 2048), 90.0)], -1)
    big = big.astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    full = np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    for name in ("big.jpg", "big.png"):
        a = read_image(tmp_path / name, 3, 32)
        assert a.shape == (3, 32, 32) and np.abs(a - full).mean() < 0.02, name


def test_tinyimagenet_needs_its_200_ids_and_refuses_unknown_annotations(tmp_path):
    write_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn99999999\t0\t0\t63\t63\nval_y.JPEG\tn99999998\t0\t0\t63\t63\n")
    with pytest.raises(UserError, match=r"2 of the 8 lines of .*val_annotations.txt name no class of wnids.txt"):
        load_eval_data(get_task("tinyimagenet"), data_root=str(tmp_path))
    (base / "wnids.txt").write_text("n00000000\nn00000001\nn00000002\n")
    with pytest.raises(UserError, match=r"wnids.txt lists 3 ids .3 distinct.; Tiny-ImageNet has 200"):
        load_eval_data(get_task("tinyimagenet"), data_root=str(tmp_path))


def test_a_trials_config_of_a_folder_task_is_built_where_the_folder_is_not(tmp_path):
    """A search resolves its folder task once, on the driver, and ships the Task with every trial: a trial on a node
    without the folder builds its config from that Task (the images themselves travel as the evaluation data)."""
    import shutil

    task = task_of(write_folder(tmp_path / "imgs", size=8, mode="L"))
    shutil.rmtree(tmp_path / "imgs")
    cfg = build_config({"task": task.name, "epochs": 1}, task=task)
    assert cfg.task_spec is task and cfg.task == task.name
    with pytest.raises(UserError, match="is not a folder"):
        get_task(task.name)  # resolved again by name, it would need the folder


@pytest.mark.parametrize("make, message", [
    (lambda p: p.symlink_to("/dev/zero"), r"must be a regular file, and this is a device or socket \(through a link"),
    (lambda p: os.mkfifo(p), "must be a regular file, and this is a pipe"),
    (lambda p: p.mkdir(), "must be a regular file, and this is a folder"),
    (lambda p: p.symlink_to(p.parent / "gone.yaml"), "is a link to .*gone.yaml, which does not exist"),
], ids=["link to /dev/zero", "named pipe", "folder", "dangling link"])
def test_a_task_yaml_that_is_not_a_regular_file_is_one_line_not_a_hang_or_a_memory_error(tmp_path, make, message):
    """``/dev/zero`` has size 0 and was read to a MemoryError; a named pipe blocked for ever; a dangling link was
    taken as no task.yaml at all."""
    root = write_folder(tmp_path / "imgs")
    make(root / "task.yaml")
    with bounded(60), pytest.raises(UserError, match=message) as e:
        load_eval_data(get_task(as_task_name(f"folder:{root}")))
    assert "\n" not in str(e.value)


def test_a_space_file_that_is_not_a_regular_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.yaml")
    for name, said in (("zero.yaml", "a device or socket"), ("pipe.yaml", "a pipe")):
        with bounded(60):
            r = run_main("search/run_search.py", "--space", tmp_path / name, "--storage", tmp_path / "runs")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and said in r.stderr
    assert not (tmp_path / "runs").exists()
