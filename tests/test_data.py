"""Tasks and data: the data-free guarantee, digits splits, torchvision loaders on generated files."""
import json

import pytest
import torch

from base.errors import DataFreeViolation, UserError
from conftest import run_cli, tiny_values
from datasets import skip_md5, write_cifar100, write_mnist
from trainable.tasks import _digits_split, data_free, get_task, load_eval_data, load_teacher_train


def test_digits_split_is_disjoint_and_seeded():
    s = _digits_split(0)
    parts = [set(s[k].tolist()) for k in ("teacher_train", "val", "test")]
    assert sum(map(len, parts)) == 1797
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert (_digits_split(0)["val"] == s["val"]).all() and not (_digits_split(1)["val"] == s["val"]).all()


def test_teacher_data_refused_inside_a_data_free_run():
    x, _ = load_teacher_train(get_task("digits"))
    assert len(x) > 1000
    with data_free():
        with pytest.raises(DataFreeViolation):
            load_teacher_train(get_task("digits"))
    load_teacher_train(get_task("digits"))  # allowed again outside


def test_a_run_never_reads_training_data(monkeypatch, digits_teacher):
    """Every data access of a whole run goes through the guard; teacher-train is never touched."""
    import trainable.tasks as tasks
    from trainable.akd import AKDRun
    from trainable.config import build_config

    calls = []
    real_split = tasks._digits_split

    def spy(seed):
        calls.append(tasks.in_data_free_run())
        return real_split(seed)

    monkeypatch.setattr(tasks, "_digits_split", spy)
    with data_free():
        data = load_eval_data(get_task("digits"))
        AKDRun(build_config(tiny_values()), digits_teacher, data, torch.device("cpu")).fit()
    assert calls and all(calls)


def test_cifar100_through_the_real_torchvision_loader(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    write_cifar100(tmp_path, n_test=50)
    skip_md5(monkeypatch)
    seen = []
    real = tvd.CIFAR100.__init__

    def record(self, root, train=True, **kw):
        seen.append(train)
        real(self, root, train=train, **kw)

    monkeypatch.setattr(tvd.CIFAR100, "__init__", record)
    with data_free():
        data = load_eval_data(get_task("cifar100"), seed=0, val_fraction=0.2, data_root=str(tmp_path))
    assert seen == [False]  # only the official test split
    assert data.val_x.shape == (10, 3, 32, 32) and data.test_x.shape == (40, 3, 32, 32)
    assert data.val_y.dtype == torch.int64 and int(data.test_y.max()) < 100
    other = load_eval_data(get_task("cifar100"), seed=1, data_root=str(tmp_path))
    assert not torch.equal(other.val_y, data.val_y)  # the split is seeded
    x, y = load_teacher_train(get_task("cifar100"), data_root=str(tmp_path))
    assert x.shape == (64, 3, 32, 32) and seen[-1] is True


def test_mnist_through_the_real_torchvision_loader(tmp_path):
    write_mnist(tmp_path)
    data = load_eval_data(get_task("mnist"), data_root=str(tmp_path))
    assert data.val_x.shape == (4, 1, 28, 28) and data.test_x.shape == (16, 1, 28, 28)


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--data-root"):
        load_eval_data(get_task("cifar100"), data_root=None)
    with pytest.raises(UserError, match="not found or corrupted"):
        load_eval_data(get_task("cifar10"), data_root=str(tmp_path))


@pytest.mark.slow
def test_train_teacher_cli_on_generated_cifar100_then_a_distillation_run(tmp_path):
    """Smoke-size teacher training, then a data-free run against it, both through their CLIs."""
    write_cifar100(tmp_path / "data")
    # The CLIs run in subprocesses: a sitecustomize module there skips the md5 of the generated files.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os, torchvision.datasets.cifar as c\n"
        "c.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)\n")
    import os
    env_path = f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"] = env_path
    try:
        r = run_cli("trainable/train_teacher.py", "--task", "cifar100", "--arch", "resnet18_half", "--epochs", "1",
                    "--batch-size", "32", "--data-root", tmp_path / "data", "--out", tmp_path / "t.pt")
        assert r.returncode == 0, r.stderr
        assert "test_acc" in r.stdout
        r = run_cli("trainable/run_akd.py", "--task", "cifar100", "--teacher", tmp_path / "t.pt",
                    "--data-root", tmp_path / "data", "--out", tmp_path / "run",
                    "--set", "teacher=resnet18_half", "--set", "student=resnet18", "--set", "student_fraction=0.05",
                    "--set", "epochs=1", "--set", "iters_per_epoch=1", "--set", "batch_size=4",
                    "--set", "latent_dim=16", "--set", "generator_width=8")
        assert r.returncode == 0, r.stderr
        final = json.loads((tmp_path / "run" / "final.json").read_text())
        assert final["teacher_params"] == 2_820_740 and final["param_ratio"] < 0.1
    finally:
        os.environ["PYTHONPATH"] = env_path.split(os.pathsep, 1)[1]
