"""The search's scheduler and searcher on hand-built rung records and trials (no Ray run, seconds)."""
import json
import math
import pickle

import optuna
import pytest

from base import metrics as M
from results.recordfile import read_record
from search.scheduler import (
    RungScheduler,
    crowding_distances,
    keeps,
    milestones,
    nondominated_fronts,
    rank_records,
    retry_errored,
)

MO = [("val_acc", "max"), ("param_ratio", "min")]
CONTINUE, STOP = RungScheduler.CONTINUE, RungScheduler.STOP


def rec(acc, ratio, budget=None):
    return {"values": [acc, ratio], "violation": 0.0 if budget is None else max(0.0, ratio - budget)}


def result(epoch, acc, ratio=0.05):
    return {M.EPOCH: epoch, M.VAL_ACC: acc, M.PARAM_RATIO: ratio}


def test_milestones_and_keep_counts():
    assert milestones(4, 3, 20) == [4, 12]
    assert milestones(5, 3, 20) == [5, 15]
    assert milestones(1, 2, 3) == [1, 2]
    assert milestones(20, 3, 20) == []
    assert [keeps(n, 3) for n in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]


def test_nondominated_fronts_and_crowding():
    # minimised: (-acc, ratio)
    pts = [(-0.95, 0.4), (-0.94, 0.3), (-0.90, 0.2), (-0.80, 0.05), (-0.85, 0.3)]
    assert nondominated_fronts(pts) == [0, 0, 0, 0, 1]  # the last is dominated by (0.94, 0.3) and (0.90, 0.2)
    d = crowding_distances(pts[:4])
    assert math.isinf(d[0]) and math.isinf(d[3]) and 0 < d[1] < math.inf and 0 < d[2] < math.inf


def test_a_small_undominated_student_survives_larger_more_accurate_ones():
    rung = {"a": rec(0.95, 0.40), "b": rec(0.94, 0.30), "c": rec(0.93, 0.20), "d": rec(0.80, 0.05)}
    order = rank_records(rung, ["max", "min"])
    assert order.index("d") < keeps(4, 3)  # kept: it is an extreme of the first front
    # Accuracy alone (stock ASHA) would stop it: it is last.
    single = {k: {"values": [v["values"][0]], "violation": 0.0} for k, v in rung.items()}
    assert rank_records(single, ["max"])[-1] == "d"


def test_within_budget_trials_rank_before_over_budget_ones():
    rung = {"big": rec(0.99, 0.40, 0.1), "bigger": rec(0.995, 0.60, 0.1), "small": rec(0.70, 0.08, 0.1),
            "tiny": rec(0.60, 0.03, 0.1)}
    order = rank_records(rung, ["max", "min"])
    assert order[:2] == ["small", "tiny"] or set(order[:2]) == {"small", "tiny"}
    assert order[2:] == ["big", "bigger"]  # infeasible: by how far over the budget


def test_dominated_trial_is_stopped_and_the_decision_is_written_first(tmp_path):
    state = tmp_path / "scheduler.json"
    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, param_budget=0.1, state_file=str(state))
    for tid, acc in (("t1", 0.90), ("t2", 0.80)):
        assert s.decide(tid, result(4, acc, 0.05)) in (CONTINUE, STOP)
    # t3 is dominated by t1 (less accurate, same size): 3 records, one kept.
    assert s.decide("t3", result(4, 0.70, 0.05)) == STOP
    on_disk = json.loads(state.read_text())
    assert on_disk["stopped"]["t3"]["reason"] == "rung" and on_disk["stopped"]["t3"]["rung"] == 4
    assert on_disk["rungs"]["4"]["t3"]["values"] == [0.70, 0.05]
    # A stopped trial is never continued, whatever it reports.
    assert s.decide("t3", result(5, 0.99, 0.05)) == STOP


def test_over_budget_trials_neither_push_out_nor_make_room_for_trials_within_it():
    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, param_budget=0.1)
    for i in range(3):  # three accurate students over the budget
        s.decide(f"big{i}", result(4, 0.99, 0.5 + i / 10))
    assert s.decide("ok", result(4, 0.60, 0.08)) == CONTINUE  # first within the budget: kept
    assert s.decide("worse", result(4, 0.50, 0.09)) == STOP  # dominated by "ok"; 2 within budget keep 1
    assert s.decide("big3", result(4, 0.999, 0.6)) == STOP  # over budget: behind both within it


def test_single_objective_without_budget_is_asha_top_one_over_eta(tmp_path):
    s = RungScheduler([("val_acc", "max")], max_epochs=20, grace_period=2, reduction_factor=2)
    decisions = [s.decide(f"t{i}", result(2, acc)) for i, acc in enumerate([0.5, 0.6, 0.4, 0.7, 0.3])]
    # n=1 keeps 1; n=2 keeps 1 (0.6 beats 0.5); n=3 keeps 2 (0.4 is third); n=4 keeps 2 (0.7 first); n=5 keeps 3
    assert decisions == [CONTINUE, CONTINUE, STOP, CONTINUE, STOP]


def test_no_early_stopping_records_nothing_and_never_stops():
    s = RungScheduler(MO, max_epochs=10, grace_period=1, reduction_factor=2, early_stopping=False)
    assert all(s.decide(f"t{i}", result(e, 0.1 * i)) == CONTINUE for i in range(5) for e in range(1, 11))
    assert not s.stopped


def test_diverged_run_is_stopped_with_its_reason():
    s = RungScheduler(MO, max_epochs=10, grace_period=2, reduction_factor=3)
    assert s.decide("t1", {M.DIVERGED: 1.0, M.ERROR: "loss_student became nan at epoch 3"}) == STOP
    assert s.stopped["t1"]["reason"] == "diverged" and "nan" in s.stopped["t1"]["error"]


def test_state_survives_pickling_by_reading_its_file(tmp_path):
    state = tmp_path / "scheduler.json"
    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, state_file=str(state))
    s.decide("t1", result(4, 0.9))
    s.decide("t2", result(4, 0.5, 0.5))
    s.decide("t3", result(4, 0.4, 0.6))
    copy = pickle.loads(pickle.dumps(s))  # what Tune's tuner.pkl gives back on restore
    assert copy.state == read_record(state) == s.state
    assert set(copy.state["rungs"]["4"]) == {"t1", "t2", "t3"} and "t3" in copy.stopped


def test_a_resume_forgets_the_errored_trials_so_that_they_run_again(tmp_path):
    """What a resume does before Tune restores the trials: the errored ones leave the record (the rest of it kept),
    so that the scheduler no longer stops them and they train again; a record with none is left as it was."""
    state = tmp_path / "scheduler.json"
    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, state_file=str(state))
    s.decide("t1", result(4, 0.9))
    s.state["errored"].update({"t2": {M.EPOCH: 3}, "t3": {M.EPOCH: 0}})
    s._write()
    assert retry_errored(str(state)) == ["t2", "t3"]
    after = read_record(state)
    assert after["errored"] == {} and set(after["rungs"]["4"]) == {"t1"}
    copy = pickle.loads(pickle.dumps(s))  # the restored scheduler reads the record: t2 is no longer done
    controller = FakeController([FakeTrial("t2", "PENDING")])
    copy.choose_trial_to_run(controller)
    assert controller.stopped == []
    mtime = state.stat().st_mtime_ns
    assert retry_errored(str(state)) == [] and state.stat().st_mtime_ns == mtime
    assert retry_errored(str(tmp_path / "none.json")) == [] and not (tmp_path / "none.json").exists()


class FakeTrial:
    def __init__(self, trial_id, status):
        self.trial_id, self.status = trial_id, status


class FakeController:
    def __init__(self, trials):
        self.trials, self.stopped = trials, []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def test_restore_never_trains_a_stopped_or_finished_trial_again(tmp_path):
    state = tmp_path / "scheduler.json"
    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, state_file=str(state))
    assert s.decide("a", result(4, 0.9)) == CONTINUE
    assert s.decide("c", result(4, 0.7)) == STOP  # b has not reached the rung yet
    s.on_trial_complete(None, FakeTrial("a", "RUNNING"), result(12, 0.95))
    # The driver dies before Tune records c (stopped) and a (finished); Tune resumes them as PENDING.
    restored = pickle.loads(pickle.dumps(s))
    tc = FakeController([FakeTrial("a", "PENDING"), FakeTrial("b", "PENDING"), FakeTrial("c", "PAUSED")])
    chosen = restored.choose_trial_to_run(tc)
    assert sorted(tc.stopped) == ["a", "c"] and chosen.trial_id == "b"


PAUSE = RungScheduler.PAUSE


def repeatable(tmp_path, order):
    s = RungScheduler([("val_acc", "max")], max_epochs=12, grace_period=4, reduction_factor=2,
                      state_file=str(tmp_path / "scheduler.json"), repeatable=True)
    s.set_order(order)
    return s


@pytest.mark.parametrize("b_acc, b_goes_on", [(0.9, True), (0.5, False)])
def test_a_repeatable_decision_waits_for_the_earlier_trials_at_its_rung(tmp_path, b_acc, b_goes_on):
    """Trial b reaches the rung before trial a (proposed first): b is paused until a is there, then ranked among a
    and itself only, whatever arrives meanwhile; the decision is the one taken had a arrived first."""
    s = repeatable(tmp_path, ["a", "b", "c"])
    assert s.decide("b", result(4, b_acc)) == PAUSE
    assert s.decide("b", result(5, 0.99)) == PAUSE  # reported before the pause took effect: changes nothing
    assert s.state["rungs"]["4"]["b"]["values"] == [b_acc] and s.state["waiting"] == {"b": 4}
    tc = FakeController([FakeTrial("a", "RUNNING"), FakeTrial("b", "PAUSED"), FakeTrial("c", "PENDING")])
    assert s.choose_trial_to_run(tc).trial_id == "c" and tc.stopped == []  # b still waits on a
    assert s.decide("c", result(4, 0.1)) == PAUSE  # c waits on a too (b has its record)
    assert s.decide("a", result(4, 0.7)) == CONTINUE  # a is first: ranked alone
    chosen = s.choose_trial_to_run(tc)
    assert s.state["waiting"] == {}
    assert "c" in s.stopped  # c is ranked among a, b, c: last
    if b_goes_on:
        assert chosen.trial_id == "b" and "b" not in s.stopped
    else:
        assert "b" in s.stopped and tc.stopped == ["b", "c"] and chosen is None
    assert read_record(tmp_path / "scheduler.json") == s.state  # written before Tune acts on it


# ----------------------------------------------------------------------------- searcher
class FakeScheduler:
    def __init__(self):
        self.stopped, self.finished, self.state = {}, {}, {}

    def set_order(self, trial_ids):
        self.state["order"] = list(trial_ids)


def make_searcher(tmp_path, objectives=MO, budget=0.1):
    from search.searcher import OptunaSearcher
    from search.space import parse_space

    space = parse_space({"params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.3, "log": True}}})
    return OptunaSearcher(space.params, objectives, seed=0, num_samples=8, study_path=str(tmp_path / "study.journal"),
                          study_name="akdtune", param_budget=budget, scheduler=FakeScheduler())


def load(tmp_path):
    from results.journal import journal_storage

    return optuna.load_study(study_name="akdtune", storage=journal_storage(tmp_path / "study.journal"))


def test_searcher_tells_pruned_complete_and_fail_with_the_budget_as_constraint(tmp_path):
    s = make_searcher(tmp_path)
    for tid in ("done", "cut", "nan", "crash"):
        config = s.suggest(tid)
        assert 0.01 <= config["lr_student"] <= 0.3
    s.on_trial_result("done", result(1, 0.5, 0.05))
    s.on_trial_result("cut", result(1, 0.4, 0.2))
    s.scheduler.stopped["cut"] = {"reason": "rung", "rung": 1}
    s.on_trial_complete("done", result(3, 0.9, 0.05))
    s.on_trial_complete("cut", result(1, 0.4, 0.2))
    s.on_trial_complete("nan", {M.DIVERGED: 1.0, M.ERROR: "loss_student became nan"})
    s.on_trial_complete("crash", None, error=True)
    study = load(tmp_path)  # another reader of the journal sees every trial and its state
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert by_ray["done"].state.name == "COMPLETE" and by_ray["done"].values == [0.9, 0.05]
    assert by_ray["cut"].state.name == "PRUNED"
    assert by_ray["nan"].state.name == "FAIL" and "nan" in by_ray["nan"].user_attrs["error"]
    assert by_ray["crash"].state.name == "FAIL"
    assert by_ray["done"].constraints == {"param_budget": pytest.approx(0.05 - 0.1)}
    assert by_ray["cut"].constraints == {"param_budget": pytest.approx(0.2 - 0.1)}  # infeasible


def test_single_objective_keeps_intermediate_values_of_pruned_trials(tmp_path):
    s = make_searcher(tmp_path, objectives=[("val_acc", "max")], budget=None)
    s.suggest("t")
    for e, acc in ((1, 0.3), (2, 0.5), (2, 0.5)):  # a resumed epoch is reported again
        s.on_trial_result("t", result(e, acc))
    s.scheduler.stopped["t"] = {"reason": "rung", "rung": 2}
    s.on_trial_complete("t", result(2, 0.5))
    t = load(tmp_path).trials[0]
    assert t.state.name == "PRUNED" and t.intermediate_values == {1: 0.3, 2: 0.5}


def test_searcher_restored_from_pickle_tells_a_trial_started_before(tmp_path):
    s = make_searcher(tmp_path)
    s.suggest("old")
    s.on_trial_result("old", result(1, 0.5, 0.05))
    restored = pickle.loads(pickle.dumps(s))  # a new driver process after --resume
    restored.scheduler.finished["old"] = result(3, 0.8, 0.05)
    restored.on_trial_complete("old")  # Tune stops it without a result: the scheduler's record is used
    t = load(tmp_path).trials[0]
    assert t.state.name == "COMPLETE" and t.values == [0.8, 0.05]
    restored.on_trial_complete("old")  # told twice: ignored
    assert len(load(tmp_path).trials) == 1


def test_wall_time_adds_up_over_sessions_and_survives_a_kill(tmp_path):
    """A search's wall time is the sum of its sessions; WallClock keeps it current while trials run."""
    import time

    from results.recordfile import read_record, write_record
    from search.callbacks import WallClock, update_wall

    meta = tmp_path / "search.json"
    write_record(meta, {"wall_s": 0.0, "wall_before": 0.0, "session_started": time.time() - 30})
    clock = pickle.loads(pickle.dumps(WallClock(str(meta), every_s=0.0)))  # as Tune restores it
    clock.on_trial_complete(0, [], None)
    first = read_record(meta)["wall_s"]
    assert 29 < first < 60  # kept current: a kill -9 now loses at most every_s of it
    # A resumed session marks its start; its time adds to what the killed one had recorded.
    write_record(meta, {**read_record(meta), "wall_before": first, "session_started": time.time() - 10})
    assert first + 9 < update_wall(str(meta)) < first + 40


def test_a_scheduler_and_searcher_pickled_by_the_earlier_version_restore(tmp_path):
    """A search started before budgets became limits resumes: param_budget (and max_t) are read as they meant."""
    from search.searcher import OptunaSearcher

    s = RungScheduler(MO, max_epochs=12, grace_period=4, reduction_factor=3, param_budget=0.1)
    old = s.__getstate__()
    old.pop("limits")
    old.update(param_budget=0.1, max_t=old.pop("max_epochs"))
    s2 = RungScheduler.__new__(RungScheduler)
    s2.__setstate__(old)
    assert s2.limits == {M.PARAM_RATIO: 0.1} and s2.max_epochs == 12
    assert s2.violation({M.PARAM_RATIO: 0.15}) == pytest.approx(0.05)
    searcher = OptunaSearcher([], MO, 0, 4, study_path=None, study_name="akdtune", param_budget=0.1,
                              scheduler=None)
    state = pickle.loads(pickle.dumps(searcher)).__dict__
    state.pop("limits")
    state["param_budget"] = 0.1
    s3 = OptunaSearcher.__new__(OptunaSearcher)
    s3.__setstate__(state)
    assert s3.limits == {M.PARAM_RATIO: 0.1}


def test_after_a_restore_the_proposals_are_the_trials_tune_restored(tmp_path):
    """Tune copies its state files one by one: a kill in the middle can leave the searcher's list of proposals older
    or newer than the trials Tune restores. The scheduler's record (written as each trial is proposed) is never
    shortened by an older list, and the proposals are then made to be exactly the trials Tune has."""
    s = make_searcher(tmp_path)
    for tid in ["a", "b"]:
        s.suggest(tid)
    s.save(str(tmp_path / "searcher-state.pkl"))  # Tune saved the searcher after two proposals...
    s.suggest("c")  # ...and the kill came after a third
    assert s.scheduler.state["order"] == ["a", "b", "c"]
    s.restore(str(tmp_path / "searcher-state.pkl"))
    assert s.asked == ["a", "b"] and s.scheduler.state["order"] == ["a", "b", "c"]  # the record is not cut
    assert s.proposed() == ["a", "b", "c"]
    s.agree_with(["a", "b", "c"])  # Tune has trial c: it is never proposed again
    assert s.asked == ["a", "b", "c"]
    s.agree_with(["a", "b"])  # Tune's state predates c: it is proposed again, in its place
    assert s.asked == ["a", "b"] and s.scheduler.state["order"] == ["a", "b"]
    s.suggest("d")
    assert s.scheduler.state["order"] == ["a", "b", "d"]



def test_a_stale_list_of_proposals_from_an_earlier_session_never_makes_a_proposal_twice(tmp_path):
    """Session 1 proposed a, b, c; Tune saved a and b only; the kill. Session 2 (the resume) proposed d in c's place,
    Tune saved its trials with d, and the kill came before Tune saved session 2's searcher. Session 3 restores Tune's
    trials a, b, d with session 1's list a, b, c: the proposals are a, b, d (the scheduler's record), d is not proposed
    again, and the next proposal takes the fourth place."""
    s = make_searcher(tmp_path)
    for tid in ["a", "b", "c"]:
        s.suggest(tid)
    s.save(str(tmp_path / "session-1.pkl"))  # saved with c (after the experiment state that lacks it)
    s.agree_with(["a", "b"])  # session 2: Tune lost c
    s.suggest("d")
    assert s.scheduler.state["order"] == ["a", "b", "d"]
    s.restore(str(tmp_path / "session-1.pkl"))  # session 3: the searcher's newest saved list is session 1's
    assert s.asked == ["a", "b", "c"] and s.proposed() == ["a", "b", "d"]
    s.agree_with(["a", "b", "d"])
    assert s.asked == ["a", "b", "d"]
    s.suggest("e")
    assert s.scheduler.state["order"] == ["a", "b", "d", "e"]


def test_a_refused_setting_drawn_again_by_a_resume_counts_once():
    import optuna

    from results.limits import ATTEMPT, OVER_BUDGET, PROPOSAL, count_refused

    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for proposal, attempt in [(3, 0), (3, 1), (3, 0), (3, 1), (5, 0)]:  # proposal 3 drawn again after a kill
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"x": 0.5},
                                                  distributions=dist, user_attrs={OVER_BUDGET: "over",
                                                                                  PROPOSAL: proposal, ATTEMPT: attempt}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"x": 0.5},
                                              distributions=dist, user_attrs={OVER_BUDGET: "over"}))  # not repeatable
    assert count_refused(study) == 4


def test_a_confirmation_run_that_failed_for_a_full_disk_stops_the_search_like_a_search_trial(tmp_path):
    """The confirmation's runs once ended errored on a full disk, without the documented "no space left on" line:
    its scheduler raises DiskFull (the search's one line, exit 3) where a run's error says the disk was full."""
    from types import SimpleNamespace

    from base.errors import DiskFull
    from search.scheduler import ConfirmScheduler

    error = tmp_path / "error.txt"
    error.write_text("OSError: [Errno 28] No space left on device: '/runs/s/confirm/trial_x/checkpoint.pt'\n")
    with pytest.raises(DiskFull):
        ConfirmScheduler().on_trial_error(None, SimpleNamespace(error_file=str(error)))
    error.write_text("RuntimeError: something else\n")
    ConfirmScheduler().on_trial_error(None, SimpleNamespace(error_file=str(error), trial_id="x"))  # not a full disk
