"""Your own images as the task (folder:PATH, ImageFolder layout), Tiny-ImageNet's layout, generators at any size."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main
from trainable.config import build_config
from trainable.errors import UserError
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
    folder_task.cache_clear()  # a test changes its folder between calls
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
    data = load_eval_data(task.name, seed=0, val_fraction=0.2)
    assert len(data.val_y) + len(data.test_y) == 15 and len(data.val_y) == 3
    assert data.val_x.shape[1:] == (1, 20, 20)
    other = load_eval_data(task.name, seed=1, val_fraction=0.2)
    assert not torch.equal(data.val_y, other.val_y) or not torch.equal(data.val_x, other.val_x)
    cfg = build_config({"task": task.name, "teacher": "cnn", "student": "cnn", "student_width": 0.5})
    assert cfg.task == task.name


def test_task_yaml_sets_the_class_order_size_and_normalisation(tmp_path):
    root = write_folder(tmp_path / "imgs", size=24)
    (root / "task.yaml").write_text("classes: [cat, ant, bee]\nmean: [0.4, 0.4, 0.4]\nstd: [0.2, 0.2, 0.2]\n"
                                    "image_size: 16\nchannels: 3\n")
    task = task_of(root)
    assert task.classes == ("cat", "ant", "bee") and task.image_size == 16 and not task.notes
    data = load_eval_data(task.name, seed=0, val_fraction=0.5)
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
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("mean: [0.5]\n")), "mean must be 3 number"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("std: [0, 1, 1]\n")), "std must be 3 number"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("channels: 2\n")), "channels must be 1 or 3"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("image_size: 2\n")), "image_size must be"),
    (lambda r: (write_folder(r), (r / "task.yaml").write_text("[1, 2\n")), "is not valid YAML"),
    (lambda r: (write_folder(r), (r / "cat" / "x").mkdir(), [p.unlink() for p in (r / "cat").glob("*.png")]),
     "class folder 'cat' holds no images"),
    (lambda r: None, "is not a folder"),
])
def test_a_bad_folder_is_one_line(tmp_path, setup, message):
    root = tmp_path / "imgs"
    setup(root)
    folder_task.cache_clear()
    with pytest.raises(UserError, match=message) as e:
        load_eval_data(as_task_name(f"folder:{root}"))
    assert "\n" not in str(e.value)


def test_a_folder_task_has_no_teacher_training_data(tmp_path):
    task = task_of(write_folder(tmp_path / "imgs"))
    with pytest.raises(UserError, match="held-out images only"):
        load_teacher_train(task.name)


def test_run_akd_refuses_a_teacher_whose_classes_differ_from_the_folders(tmp_path):
    import torchvision

    root = write_folder(tmp_path / "imgs", size=32)
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r18.pt")
    folder_task.cache_clear()
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
    data = load_eval_data("tinyimagenet", seed=0, val_fraction=0.5, data_root=str(tmp_path))
    assert data.val_x.shape[1:] == (3, 64, 64) and len(data.val_y) + len(data.test_y) == 6
    assert set(torch.cat([data.val_y, data.test_y]).tolist()) == {0, 1, 2}  # sorted wnids
    x, y = load_teacher_train("tinyimagenet", data_root=str(tmp_path))
    assert x.shape == (6, 3, 64, 64) and y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UserError, match="wnids.txt is missing"):
        load_eval_data("tinyimagenet", data_root=str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_one_run_with_a_torchvision_teacher_and_student_on_a_folder_and_one_on_tinyimagenet(tmp_path):
    import torchvision

    from trainable.models import build_classifier

    root = write_folder(tmp_path / "imgs", size=32, n=4)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    fast = ["--set", "epochs=1", "--set", "iters_per_epoch=1", "--set", "batch_size=4", "--set", "precision=fp32",
            "--set", "channels_last=false"]
    folder_task.cache_clear()
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
