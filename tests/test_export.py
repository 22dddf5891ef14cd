"""The exported student runs without this project: torch.export.load in a fresh Python, same accuracy."""
import json
import subprocess
import sys

import pytest
import torch

from base import metrics as M
from conftest import tiny_values
from trainable.akd import AKDRun
from trainable.config import build_config
from trainable.outputs import finish_run
from trainable.programs import read_program
from trainable.tasks import data_free

FRESH = """
import json, sys
import torch
x, y = torch.load(sys.argv[2], weights_only=True)
model = torch.export.load(sys.argv[1]).module()
with torch.no_grad():
    acc = sum((model(x[i:i + 64]).argmax(1) == y[i:i + 64]).sum().item() for i in range(0, len(y), 64)) / len(y)
project = [m for m in sys.modules if m.split(".")[0] in ("base", "trainable", "search", "results")]
print(json.dumps({"acc": acc, "project_modules": project}))
"""


@pytest.mark.slow
def test_student_pt2_loads_in_a_fresh_python_and_reproduces_test_acc(tmp_path, digits_teacher, digits_data):
    with data_free():
        run = AKDRun(build_config(tiny_values(epochs=3, iters_per_epoch=5)), digits_teacher, digits_data,
                     torch.device("cpu"))
        run.fit()
        final = finish_run(run, tmp_path / "out", {M.TEACHER_VAL_ACC: 1.0, M.TEACHER_TEST_ACC: 1.0}, 1.0)
    assert (tmp_path / "out" / "student.pt2").is_file()
    read_program(tmp_path / "out" / "student.pt2")  # what is passed around passes the checks a .pt2 teacher passes
    torch.save((digits_data.test_x, digits_data.test_y), tmp_path / "test.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    r = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "out" / "student.pt2"),
                        str(tmp_path / "test.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["project_modules"] == []
    assert abs(got["acc"] - final[M.TEST_ACC]) <= 0.001  # within 0.1 point


def test_inference_cost_is_measured_once_when_a_run_finishes(tmp_path, digits_teacher, digits_data):
    with data_free():
        run = AKDRun(build_config(tiny_values()), digits_teacher, digits_data, torch.device("cpu"))
        h = run.fit()
        final = finish_run(run, tmp_path, {M.TEACHER_VAL_ACC: 1.0, M.TEACHER_TEST_ACC: 1.0}, 1.0)
    assert set(final) == set(M.FINAL_METRICS)
    assert final[M.FLOPS] == h[-1][M.FLOPS] == run.student_flops > 0
    assert final[M.LATENCY_MS] > 0 and final[M.THROUGHPUT] > 0 and final[M.THREADS] >= 1
    assert final[M.SIZE_BYTES] == (tmp_path / "student.pt2").stat().st_size
    # A conv's multiply-adds dominate: at least 2 x params x (8x8 / 4) for this 8x8 CNN.
    assert final[M.FLOPS] > 2 * run.student_params


ONNX = ("onnx", "onnxscript", "onnxruntime")


def test_student_onnx_is_one_file_that_onnxruntime_runs_like_torch(tmp_path, capsys):
    """Where the ONNX exporter is installed (``pip install -e .[onnx]``; CI installs it), ``student.onnx`` is
    written beside ``student.pt2``: weights inside, any batch size, the same logits; the exporter prints nothing."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ONNX):
        pytest.skip("onnx, onnxscript and onnxruntime are not installed (pip install -e .[onnx])")
    import onnxruntime

    from trainable.models import build_classifier
    from trainable.outputs import export_student

    torch.manual_seed(0)
    student = build_classifier("cnn", 10, 1, 8, 0.3125).eval()
    export_student(student, 1, 8, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.pt2"]  # no weights file beside it
    assert capsys.readouterr().out == ""
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"))
    name = session.get_inputs()[0].name
    for batch in (1, 7, 300):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            want = student(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        assert got.shape == want.shape and abs(got - want).max() < 1e-4


def test_a_failed_onnx_export_leaves_no_file_and_says_so(tmp_path, capsys, monkeypatch):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ONNX[:2]):
        pytest.skip("onnx and onnxscript are not installed (pip install -e .[onnx])")
    from trainable.models import build_classifier
    from trainable.outputs import export_student

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken)
    export_student(build_classifier("cnn", 10, 1, 8, 0.25).eval(), 1, 8, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt2"]
    err = capsys.readouterr().err
    assert err == "note: student.onnx not written (RuntimeError: unsupported operator); student.pt2 is the export\n"
