"""The benchmark scripts run and end with their ratio line (no timing is asserted here)."""
import math
import re

import pytest
import torch

from conftest import run_cli


def _bench_lines(script: str, *args: str) -> list[str]:
    """The lines a benchmark printed, once it has exited cleanly and ended with its ``ratio=<number>`` line."""
    r = run_cli(script, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio=\d+\.\d+", lines[-1])
    return lines


@pytest.mark.slow
def test_step_throughput_runs_and_prints_a_ratio():
    lines = _bench_lines("bench/step_throughput.py", "--shapes", "digits", "--repeats", "1", "--batch", "16")
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


def _capacity_check():
    from search.budget import BudgetCheck
    from search.space import load_space
    from trainable.models import build_classifier, count_params

    space = load_space("spaces/capacity.yaml")
    base = {"task": "digits", "epochs": space.max_epochs, **space.fixed}
    teacher = build_classifier("cnn", 10, 1, 8)
    return space, BudgetCheck(base, count_params(teacher), dict(space.limits))


def test_ceiling_bench_takes_the_largest_student_within_the_budget():
    from base import metrics as M
    from bench.capacity_ceiling import grid_settings, largest_within

    space, check = _capacity_check()
    sizing, size = largest_within(space, check)
    assert list(sizing) == ["student_fraction"] and size <= space.param_budget
    held = {"lr_student": 0.1, "lr_generator": 0.001}
    assert check.costs({**held, **sizing})[M.PARAM_RATIO] == size
    # every larger size the range offers is over the budget
    fractions = [sizing["student_fraction"] * 1.05 ** k for k in range(1, 40)]
    larger = [c[M.PARAM_RATIO] for f in fractions if f <= 0.5
              for c in [check.costs({**held, "student_fraction": f})] if c[M.PARAM_RATIO] > size]
    assert larger and all(r > space.param_budget for r in larger)
    settings = grid_settings(space, sizing, {"lr_student": (0.1, 0.2), "lr_generator": (0.001,)})
    assert settings == [{**sizing, "lr_student": 0.1, "lr_generator": 0.001},
                        {**sizing, "lr_student": 0.2, "lr_generator": 0.001}]
    # a parameter left out of the grid is held at the middle of its (log) range
    (one,) = grid_settings(space, sizing, {"lr_student": (0.1,)})
    lrg = next(p for p in space.params if p.name == "lr_generator")
    assert one["lr_generator"] == pytest.approx((lrg.low * lrg.high) ** 0.5)


@pytest.mark.parametrize("grid, message", [
    (["lr_students=0.1"], "not a parameter of"),
    (["lr_student"], "is not NAME=V1,V2"),
    (["lr_student=0.1,"], "is not NAME=V1,V2"),
    (["lr_student=fast"], "'fast' is not a finite number"),
    (["lr_student=0.1,nan"], "nan is not a finite number"),
    (["lr_student=-0.1"], "lr_student"),
])
def test_ceiling_bench_refuses_a_bad_grid_in_one_line(grid, message):
    from conftest import run_main

    args = [a for g in grid for a in ("--grid", g)]
    r = run_main("bench/capacity_ceiling.py", "--seeds", "0", "--epochs", "1", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)


@pytest.mark.slow
def test_ceiling_bench_runs_and_prints_the_ceiling():
    r = run_cli("bench/capacity_ceiling.py", "--seeds", "0", "--epochs", "1", "--confirm-seeds", "2",
                "--grid", "lr_student=0.1,0.2", "--grid", "lr_generator=0.001", "--against", "0.5", "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "the largest student within param_ratio <= 0.1 is 8.4%" in lines[0]
    for lr in ("0.1", "0.2"):
        assert re.search(rf"lr_student={lr}, lr_generator=0\.001 +test_acc per seed 0\.\d{{4}}  mean 0\.\d{{4}}",
                         r.stdout)
    assert any(ln.startswith("ceiling: 0.") and "4 runs" in ln for ln in lines)
    assert re.search(r"noise: the settings' means spread by 0\.\d{4} \(std\); the runs' noise alone would spread "
                     r"equally good settings by 0\.\d{4}\. Mean of all settings 0\.\d{4}; the best of 2", r.stdout)
    assert re.fullmatch(r"ratio=-?\d+\.\d\d", lines[-1])


def test_ceiling_noise_sets_the_settings_spread_beside_the_runs_own():
    from bench.capacity_ceiling import noise

    a = {0: [0.90, 0.92], 1: [0.94, 0.96]}  # mean 0.93; runs within a seed 0.01 from their cell's mean
    b = {0: [0.91, 0.93], 1: [0.95, 0.97]}  # mean 0.94
    n = noise([a, b])
    assert n["mean"] == pytest.approx(0.935)
    assert n["spread"] == pytest.approx(0.01 / math.sqrt(2))
    # pooled within-cell std sqrt(8e-4 / 4) over the square root of a setting's 4 runs
    assert n["noise_spread"] == pytest.approx(math.sqrt(2e-4) / 2)
    # the best of 2 equally good settings: about 0.56 of their mean's std above the mean (1/sqrt(pi))
    assert 0.5 < n["luck"] / n["noise_spread"] < 0.65
    # a seed that is easier for every setting moves neither spread
    shifted = noise([{0: a[0], 1: [x + 0.02 for x in a[1]]}, {0: b[0], 1: [x + 0.02 for x in b[1]]}])
    assert shifted["spread"] == pytest.approx(n["spread"])
    assert shifted["noise_spread"] == pytest.approx(n["noise_spread"])
    # more settings: a larger expected lead of the best by chance
    assert noise([a, b, a, b, a, b])["luck"] > n["luck"]
    # one run per seed: the runs' own noise cannot be told
    assert math.isnan(noise([{0: [0.9]}, {0: [0.95]}])["noise_spread"])


def test_search_quality_gives_the_per_seed_differences_and_their_standard_error():
    from bench.search_quality import spread

    assert spread([-0.0028, -0.0013, 0.018]) == " (per seed -0.28, -0.13, +1.80; standard error of the mean 0.67)"
    assert spread([0.01]) == " (per seed +1.00)"


@pytest.mark.parametrize("space, message", [
    ("nope.yaml", "space file not found"),
    ("spaces/lr.yaml", "has no budget"),
])
def test_ceiling_bench_refuses_a_space_it_cannot_measure_in_one_line(space, message):
    from conftest import run_main

    r = run_main("bench/capacity_ceiling.py", "--space", space, "--seeds", "0")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)


@pytest.mark.slow
def test_digits_recipe_compares_a_variant_with_the_shipped_recipe():
    lines = _bench_lines("bench/digits_recipe.py", "--seeds", "0", "--repeats", "1", "--epochs", "1")
    assert any(ln.startswith("shipped ") and "ms/iteration" in ln for ln in lines)
    assert any(ln.startswith("batch_size=128,generator_width=32") and "against shipped" in ln for ln in lines)


@pytest.mark.slow
@pytest.mark.parametrize("form, recipe", [
    ("pt2", "has no BatchNorm statistics to match (no normalisation layers): KL between teacher and student"),
    ("bn-pt2", "the BatchNorm-statistics term (w_bn 1), for the teacher"),
])
def test_the_bnfree_bench_runs_the_default_command_and_says_the_recipe_and_the_verdict(ray_address, form, recipe):
    """A program without batch-norm operations gets the BatchNorm-free recipe; one with them keeps w_bn (tapped)."""
    lines = _bench_lines("bench/bnfree_teacher.py", "--smoke", "--teacher-form", form, "--address", ray_address)
    assert any(ln.startswith("recipe: ") and recipe in ln for ln in lines), lines
    assert any(ln.startswith("verdict: ") for ln in lines), lines
