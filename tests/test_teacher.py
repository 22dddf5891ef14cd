"""Teacher checkpoints: every accepted form loads; every bad one is one clear line, exit 2."""
import pytest
import torch

from base.errors import CheckpointError
from conftest import run_main
from trainable.models import build_classifier
from trainable.tasks import TASKS
from trainable.teacher import load_teacher

C100 = TASKS["cifar100"]


@pytest.fixture(scope="module")
def resnet34_state():
    torch.manual_seed(0)
    return build_classifier("resnet34", 100, 3, 32).state_dict()


@pytest.mark.parametrize("form", ["raw", "state_dict", "model", "module_prefix", "nested_module_prefix"])
def test_accepted_forms(tmp_path, resnet34_state, form):
    sd = resnet34_state
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {"raw": sd, "state_dict": {"state_dict": sd, "epoch": 200}, "model": {"model": sd, "acc": 0.77},
           "module_prefix": prefixed, "nested_module_prefix": {"state_dict": prefixed}}[form]
    torch.save(obj, tmp_path / "t.pt")
    model = load_teacher(tmp_path / "t.pt", "resnet34", C100)
    assert torch.equal(model.state_dict()["linear.weight"], sd["linear.weight"])


def test_wrong_class_count(tmp_path):
    torch.save(build_classifier("resnet34", 10, 3, 32).state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="checkpoint has 10 output classes; task cifar100 needs 100"):
        load_teacher(tmp_path / "t.pt", "resnet34", C100)


def test_wrong_architecture(tmp_path):
    torch.save(build_classifier("resnet18", 100, 3, 32).state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="does not fit teacher architecture 'resnet34'"):
        load_teacher(tmp_path / "t.pt", "resnet34", C100)
    torch.save(build_classifier("resnet34_tv", 100, 3, 32).state_dict(), tmp_path / "tv.pt")
    load_teacher(tmp_path / "tv.pt", "resnet34_tv", C100)


def test_wrong_width(tmp_path):
    torch.save(build_classifier("resnet34", 100, 3, 32, width=0.5).state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="has shape"):
        load_teacher(tmp_path / "t.pt", "resnet34", C100)


def test_corrupt_missing_and_unsafe_files(tmp_path, resnet34_state):
    torch.save(resnet34_state, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_teacher(tmp_path / "trunc.pt", "resnet34", C100)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(tmp_path / "nope.pt", "resnet34", C100)

    # A pickled arbitrary object (here an argparse.Namespace), which weights_only loading refuses.
    import argparse
    torch.save({"state_dict": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt, or holds objects"):
        load_teacher(tmp_path / "evil.pt", "resnet34", C100)
    torch.save({"weights": [1, 2]}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_teacher(tmp_path / "empty.pt", "resnet34", C100)


def test_cli_bad_teacher_is_exit_2_one_line(tmp_path):
    torch.save(build_classifier("cnn", 10, 3, 32).state_dict(), tmp_path / "t.pt")
    r = run_main("trainable/run_akd.py", "--task", "cifar100", "--teacher", tmp_path / "t.pt",
                "--data-root", tmp_path, "--out", tmp_path / "run", "--set", "teacher=cnn")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint has 10 output classes; task cifar100 needs 100" in lines[0]
    assert not (tmp_path / "run").exists()
