"""Settings over a space's budget are refused before training (``search.budget``)."""
from __future__ import annotations

import pickle

import optuna
import pytest

from base import metrics as M
from base.errors import UserError
from results.limits import OVER_BUDGET
from search.budget import BudgetCheck, check_reachable
from search.space import parse_space

FRACTION = {"student_fraction": {"type": "float", "low": 0.02, "high": 0.5, "log": True}}
MO = [(M.VAL_ACC, "max"), (M.PARAM_RATIO, "min")]


@pytest.fixture(scope="module")
def teacher_params(digits_teacher):
    from trainable.models import count_params

    return count_params(digits_teacher)


def test_costs_are_what_the_run_reports(digits_teacher, digits_data, teacher_params):
    """The check works out param_ratio and flops on the meta device; the trained run reports the same numbers."""
    from trainable.akd import AKDRun
    from trainable.config import build_config

    check = BudgetCheck({"task": "digits"}, teacher_params, {M.PARAM_RATIO: 0.1, M.FLOPS: 400_000})
    for setting in ({"student_fraction": 0.03}, {"student_fraction": 0.097}, {"student_width": 0.5},
                    {"student_fraction": 0.2, "student_width": 0.9}):
        run = AKDRun(build_config({"task": "digits", **setting}), digits_teacher, digits_data,
                     device=__import__("torch").device("cpu"))
        costs = check.costs(setting)
        assert costs[M.PARAM_RATIO] == pytest.approx(run.student_params / run.teacher_params)
        assert costs[M.FLOPS] == run.student_flops


def test_over_says_which_limit_and_by_how_much(teacher_params):
    check = BudgetCheck({"task": "digits"}, teacher_params, {M.PARAM_RATIO: 0.1})
    assert check.over({"student_fraction": 0.05}) is None
    reason = check.over({"student_fraction": 0.3})
    assert reason.startswith("params 28.8% of the teacher") and reason.endswith("over the budget of params <= 10% of the teacher")
    # 0.099 of the teacher is the closest width on the channel grid to 10.2%: over, as the run would report it
    assert check.over({"student_fraction": 0.099}) is not None
    flops = BudgetCheck({"task": "digits"}, teacher_params, {M.FLOPS: 300_000})
    assert flops.over({"student_fraction": 0.05}) is None
    assert "flops 473,120" in flops.over({"student_fraction": 0.1})
    # no budget, or a budget on something only training tells: nothing is refused
    assert not BudgetCheck({"task": "digits"}, teacher_params, {}).active
    assert BudgetCheck({"task": "digits"}, teacher_params, {}).over({"student_fraction": 0.5}) is None
    # an invalid configuration is not judged here: its trial fails with the configuration's own message
    assert check.over({"student_fraction": "big"}) is None
    assert pickle.loads(pickle.dumps(check)) == check  # Tune pickles the searcher that holds it


def test_the_searcher_never_hands_tune_a_setting_over_the_budget(tmp_path, teacher_params):
    from results.journal import journal_storage
    from results.limits import refused_over_budget
    from search.searcher import OptunaSearcher

    space = parse_space({"params": FRACTION})
    check = BudgetCheck({"task": "digits"}, teacher_params, {M.PARAM_RATIO: 0.1})
    path = tmp_path / "study.journal"
    s = OptunaSearcher(space.params, MO, seed=0, num_samples=8, study_path=str(path), study_name="akdtune",
                       param_budget=0.1, budget_check=check)
    suggested = [s.suggest(f"t{i}") for i in range(8)]
    assert all(check.over(c) is None for c in suggested)
    assert all(check.costs(c)[M.PARAM_RATIO] <= 0.1 for c in suggested)
    study = optuna.load_study(study_name="akdtune", storage=journal_storage(path))
    refused = [t for t in study.trials if OVER_BUDGET in t.user_attrs]
    trained = [t for t in study.trials if "ray_trial_id" in t.user_attrs]
    # 2%-50% log-uniform: about half the random draws are over 10%
    assert len(trained) == 8 and len(refused) >= 3
    # pruned before a first step, infeasible for TPE: it learns where the budget ends
    assert all(t.state.name == "PRUNED" and not t.intermediate_values and t.params["student_fraction"] > 0.09
               and t.constraints["param_budget"] > 0 for t in refused)
    # the trials Tune runs are told their (feasible) constraint at once
    assert all(t.state.name == "RUNNING" and t.constraints["param_budget"] <= 0 for t in trained)
    assert refused_over_budget(str(path)) == len(refused)
    # the searcher survives Tune's pickling with its check, and one pickled before the check existed restores
    assert pickle.loads(pickle.dumps(s)).budget_check == check
    state = pickle.loads(pickle.dumps(s)).__dict__
    state.pop("budget_check")
    old = OptunaSearcher.__new__(OptunaSearcher)
    old.__setstate__(state)
    assert old.budget_check is None


def test_a_space_without_a_setting_in_its_budget_is_refused_in_one_line(teacher_params):
    space = parse_space({"params": {"student_fraction": {"type": "float", "low": 0.2, "high": 0.5}}})
    check = BudgetCheck({"task": "digits"}, teacher_params, {M.PARAM_RATIO: 0.1})
    with pytest.raises(UserError, match=r"none of 30 settings .* fits its budget \(the smallest drawn: params 19\.7% of the teacher, over"):
        check_reachable(space.params, check, seed=0)
    check_reachable(parse_space({"params": FRACTION}).params, check, seed=0)  # a sound space passes
    check_reachable(space.params, BudgetCheck({"task": "digits"}, teacher_params, {}), seed=0)  # no budget


def test_the_search_command_refuses_an_impossible_budget_before_writing(tmp_path):
    from tests.conftest import run_main

    space = tmp_path / "s.yaml"
    space.write_text("objectives: [{metric: val_acc, mode: max}]\nparam_budget: 0.05\n"
                     "params:\n  student_fraction: {type: float, low: 0.3, high: 0.6}\n")
    r = run_main("search/run_search.py", "--space", str(space), "--storage", str(tmp_path / "runs"), "--smoke")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fits its budget" in r.stderr
    assert not (tmp_path / "runs").exists()


class RefuseAll:
    """A budget check under which nothing fits."""

    active = True

    def costs(self, setting):
        return {M.PARAM_RATIO: 0.5}

    def reason(self, costs):
        return "params 50.0% of the teacher, over the budget of params <= 10% of the teacher"


def test_after_max_refusals_in_a_row_the_next_setting_is_trained_with_a_warning(caplog):
    from search.budget import MAX_REFUSALS
    from search.searcher import OptunaSearcher

    s = OptunaSearcher(parse_space({"params": FRACTION}).params, MO, seed=0, num_samples=4, study_path=None,
                       study_name="akdtune", param_budget=0.1, budget_check=RefuseAll())
    with caplog.at_level("WARNING", logger="search.searcher"):
        setting = s.suggest("t0")
    assert "student_fraction" in setting
    trials = s.study.trials
    assert len(trials) == MAX_REFUSALS + 1  # a search never hangs on a space that is nearly all over budget
    assert sum(OVER_BUDGET in t.user_attrs for t in trials) == MAX_REFUSALS
    assert trials[-1].user_attrs["ray_trial_id"] == "t0" and trials[-1].state.name == "RUNNING"
    assert f"{MAX_REFUSALS} settings in a row were over the budget" in caplog.text
