"""run_search.py --estimate: the expected wall time and memory of a search, before it runs."""
import math
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_main
from search.estimate import wall_seconds
from search.scheduler import expected_epochs


def test_without_rungs_every_trial_runs_max_epochs():
    assert expected_epochs(20, [], 3, 16) == 20


def test_asynchronous_halving_promotes_early_arrivals_more_often_than_one_in_eta():
    # One rung at 4 of 10, eta 2, 4 trials: arrivals 1..4 go on with probability 1, 1/2, 2/3, 1/2.
    share = (1 + 1 / 2 + 2 / 3 + 1 / 2) / 4
    assert expected_epochs(10, [4], 2, 4) == pytest.approx(4 + share * 6)
    per_trial = expected_epochs(20, [4, 12], 3, 16)
    assert 4 + 8 / 3 + 8 / 9 < per_trial < 20  # more than synchronous halving's share, less than no stopping
    assert expected_epochs(20, [4, 12], 3, 1000) < per_trial  # the early-arrival effect fades with more trials


def plan(**kw):
    base = dict(grace_period=4, reduction_factor=3, max_epochs=20, early_stopping=True, num_samples=16,
                confirm_top_k=2, confirm_seeds=2)
    return SimpleNamespace(**{**base, **kw})


def test_the_wall_time_adds_the_search_the_confirmation_and_the_start():
    w = wall_seconds(plan(), epoch_s=2.0, at_once=2)
    assert w["search_s"] == pytest.approx(16 * w["epochs_per_trial"] * 2.0 / 2)
    assert w["confirm_s"] == pytest.approx(math.ceil(2 / 2) * 20 * 2.0)
    assert w["total_s"] == pytest.approx(w["search_s"] + w["confirm_s"] + w["startup_s"])
    assert wall_seconds(plan(early_stopping=False), 2.0, 2)["epochs_per_trial"] == 20
    assert wall_seconds(plan(confirm_top_k=0), 2.0, 2)["confirm_s"] == 0


def test_estimate_with_resume_is_refused_in_one_line(tmp_path):
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--estimate", "--resume",
                 "--storage", tmp_path)
    assert r.returncode == 2 and "--estimate plans a new search; drop --resume" in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.slow
def test_estimate_prints_the_expected_wall_time_and_writes_no_search(tmp_path):
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--smoke", "--estimate",
                 "--storage", tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    assert "smallest student" in r.stdout and "largest student" in r.stdout
    assert "expected wall time of the whole search: about" in r.stdout
    assert not (tmp_path / "runs").exists()
