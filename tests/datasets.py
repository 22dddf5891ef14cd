"""Small datasets in the real on-disk formats torchvision reads (CIFAR pickles, MNIST idx files)."""
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar100(root: Path, n_train: int = 64, n_test: int = 50, seed: int = 0) -> Path:
    """``cifar-100-python/{train,test,meta}`` as in the official archive (pickled dicts, uint8 rows)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 100).tolist()
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": labels,
            "coarse_labels": [lbl // 5 for lbl in labels],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),  # rows: R(1024) G(1024) B(1024)
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    return root


def write_cifar10(root: Path, n_train: int = 60, n_test: int = 40, seed: int = 0) -> Path:
    """``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as in the official archive."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        entry = {"batch_label": name, "labels": (np.arange(n) % 10).tolist(),
                 "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train // 5}, f)
    return root


def write_mnist(root: Path, n_train: int = 32, n_test: int = 20, seed: int = 0) -> Path:
    """``MNIST/raw/*-ubyte`` idx files (big-endian headers), as torchvision extracts them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def skip_md5(monkeypatch):
    """The generated files are real in format but not the official bytes: check presence, not checksums."""
    import os

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
