"""The single-run CLI end to end (small), and its bad-input handling."""
import json

import pytest

from base import metrics as M
from conftest import run_cli, run_main

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


def test_ctrl_c_in_a_run_is_one_line_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from trainable.akd import AKDRun

    fit = AKDRun.fit

    def interrupted_after_one_epoch(self, on_epoch=None):
        def then_ctrl_c(m, run):
            on_epoch(m, run)
            raise KeyboardInterrupt

        return fit(self, then_ctrl_c)

    out = tmp_path / "run"
    monkeypatch.setattr(AKDRun, "fit", interrupted_after_one_epoch)
    r = run_main("trainable/run_akd.py", "--task", "digits", "--out", out, *SMALL)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Resume with:" in lines[0] and lines[0].endswith("--resume") and "Traceback" not in r.stderr
    command = lines[0].split("Resume with:", 1)[1].split()
    assert command[:2] == ["python", "trainable/run_akd.py"]
    monkeypatch.setattr(AKDRun, "fit", fit)
    r = run_main(*command[1:])  # the printed command, as it is
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_ctrl_c_before_the_first_epoch_and_in_teacher_training_is_one_line(tmp_path, monkeypatch):
    from trainable import train_teacher
    from trainable.akd import AKDRun

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AKDRun, "fit", ctrl_c)
    r = run_main("trainable/run_akd.py", "--task", "digits", "--out", tmp_path / "run", *SMALL)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "run the same command again" in r.stderr
    monkeypatch.setattr(train_teacher, "train_teacher", ctrl_c)
    r = run_main("trainable/train_teacher.py", "--task", "digits", "--out", tmp_path / "t.pt")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no teacher was saved" in r.stderr
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.slow
def test_a_real_sigint_in_a_run_is_exit_3_without_a_traceback(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(ROOT / "trainable" / "run_akd.py"), "--task", "digits", "--out", str(out),
                          "--set", "epochs=500", "--set", "iters_per_epoch=2", "--set", "batch_size=16"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("--resume")
