"""The single-run CLI end to end (small), and its bad-input handling."""
import json

import pytest

from conftest import run_cli, run_main
from trainable import metrics as M

SMALL = ["--set", "epochs=2", "--set", "iters_per_epoch=2", "--set", "batch_size=16"]


@pytest.mark.slow
def test_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = run_cli("trainable/run_akd.py", "--task", "digits", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.jsonl", "final.json", "student.pt", "generated.png",
                 "confusion_test.csv", "checkpoint.pt"):
        assert (out / name).is_file(), name
    final = json.loads((out / "final.json").read_text())
    assert set(final) == set(M.FINAL_METRICS)
    assert final["teacher_test_acc"] >= 0.98
    assert final["param_ratio"] <= 0.10
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and set(epochs[0]) == set(M.EPOCH_METRICS) - {M.LOSS_DISCRIMINATOR, M.VAL_AGREEMENT}
    rows = (out / "confusion_test.csv").read_text().splitlines()
    assert len(rows) == 11 and sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == 360
    import torch
    assert "linear.weight" in torch.load(out / "student.pt", weights_only=True)

    # Refuses to overwrite; resumes to a longer budget without duplicating epochs.
    r = run_cli("trainable/run_akd.py", "--task", "digits", "--out", out, *SMALL)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("trainable/run_akd.py", "--task", "digits", "--out", out, *SMALL, "--set", "epochs=3", "--resume")
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]


@pytest.mark.parametrize("args, needle", [
    (["--set", "lr_student=0"], "lr_student: must be > 0"),
    (["--set", "n_student=0"], "n_student: must be >= 1"),
    (["--set", "student_fraction=1.2"], "student_fraction: must be in (0, 1)"),
    (["--set", "student=vgg"], "student: unknown 'vgg'; choose from"),
    (["--set", "colour=red"], "colour: unknown key"),
    (["--set", "epochs=many"], "epochs: expected an integer"),
    (["--set", "novalue"], "--set expects key=value"),
    (["--task", "imagenet"], "task: unknown 'imagenet'"),
    (["--resume"], "nothing to resume"),
])
def test_bad_input_is_exit_2_one_line(tmp_path, args, needle):
    r = run_main("trainable/run_akd.py", "--out", tmp_path / "run", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
