"""The benchmark scripts run and end with their ratio line (no timing is asserted here)."""
import re

import pytest
import torch

from conftest import run_cli


@pytest.mark.slow
def test_step_throughput_runs_and_prints_a_ratio():
    r = run_cli("bench/step_throughput.py", "--shapes", "digits", "--repeats", "1", "--batch", "16")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio=\d+\.\d+", lines[-1])
    assert any("straightforward" in ln for ln in lines) and any("project bf16 channels_last" in ln for ln in lines)
    assert any(ln.startswith("matmul peak") for ln in lines)
    rows = [ln for ln in lines if "img/s" not in ln and re.search(r"% \((fp32|bf16)\)$", ln)]
    assert len(rows) >= 7, lines  # every variant: GFLOP per iteration, GFLOP/s and its share of the peak
    assert any("project avkd" in ln for ln in rows) and any("feature alignment" in ln for ln in rows)


@pytest.mark.slow
def test_gpu_packing_says_when_skipped():
    if torch.cuda.is_available():
        pytest.skip("measured for real on a GPU machine (python bench/gpu_packing.py); too slow for the suite")
    r = run_cli("bench/gpu_packing.py")
    assert r.returncode == 0 and "skipped" in r.stdout and r.stdout.strip().endswith("ratio=nan")
