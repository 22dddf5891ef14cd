"""Choosing and confirming the winner, on hand-built trials (no Ray run)."""
from pathlib import Path

import pandas as pd
import pytest

from base import metrics as M
from results.summary import Experiment
from search.confirm import candidates, choose_winner, confirmation_plan, mean_std, summarise_candidate


def experiment(rows):
    cols = dict(error="", within_budget=True, param_ratio=0.05, _dir="/x", winner=False)
    trials = pd.DataFrame([{**cols, **r} for r in rows])
    return Experiment(Path("/x"), {}, {}, {}, trials, pd.DataFrame())


ROWS = [
    dict(trial_id="full", outcome="completed", final_val_acc=0.95, epochs_run=20, _dir="/x/full"),
    dict(trial_id="cut", outcome="stopped_early", final_val_acc=0.96, epochs_run=12, _dir="/x/cut"),
    dict(trial_id="big", outcome="completed", final_val_acc=0.99, epochs_run=20, within_budget=False, param_ratio=0.4),
    dict(trial_id="nan", outcome="diverged", final_val_acc=None, epochs_run=0),
    dict(trial_id="err", outcome="errored", final_val_acc=0.97, epochs_run=3),
    dict(trial_id="low", outcome="completed", final_val_acc=0.80, epochs_run=20),
]


def test_candidates_are_succeeded_trials_within_the_budget_best_first():
    e = experiment(ROWS)
    assert [c["trial_id"] for c in candidates(e, 3)] == ["cut", "full", "low"]
    assert [c["trial_id"] for c in candidates(e, 0)] == ["cut"]  # confirmation off: the best is still finished


def test_candidates_fall_back_to_the_most_accurate_when_none_is_within_budget():
    e = experiment([{**r, "within_budget": False} for r in ROWS])
    assert candidates(e, 1)[0]["trial_id"] == "big"


def test_failed_trials_are_never_candidates():
    e = experiment([r for r in ROWS if r["trial_id"] in ("nan", "err")])
    assert candidates(e, 3) == []


def test_plan_continues_a_stopped_trial_and_adds_fresh_seeds():
    e = experiment(ROWS)
    configs = {r["trial_id"]: {"seed": 7, "lr_student": 0.1, "epochs": 20} for r in ROWS}
    p = confirmation_plan(e, configs, top_k=2, seeds=3, max_epochs=20, checkpoint_of=lambda d: Path(d) / "ckpt.pt")
    assert [c["trial_id"] for c in p["candidates"]] == ["cut", "full"]
    assert all(c["seeds"] == [7, 1007, 2007] for c in p["candidates"])
    runs = [(r["candidate"], r["seed"], r.get("continue_from")) for r in p["runs"]]
    assert runs == [("cut", 7, "cut/ckpt.pt"), ("cut", 1007, None), ("cut", 2007, None),
                    ("full", 1007, None), ("full", 2007, None)]  # full's own seed already ran 20 epochs
    assert all(r["epochs"] == 20 and r["lr_student"] == 0.1 for r in p["runs"])


def test_confirmation_off_still_finishes_the_best():
    e = experiment(ROWS)
    configs = {r["trial_id"]: {"seed": 0} for r in ROWS}
    p = confirmation_plan(e, configs, top_k=0, seeds=3, max_epochs=20, checkpoint_of=lambda d: Path(d) / "ckpt.pt")
    assert p["seeds"] == 1 and [(r["candidate"], r["seed"]) for r in p["runs"]] == [("cut", 0)]


def run(seed, val, test, ratio=0.05):
    return {"seed": seed, "epochs": 20, M.VAL_ACC: val, M.TEST_ACC: test, M.STUDENT_PARAMS: 100, M.PARAM_RATIO: ratio,
            "checkpoint": f"/c/{seed}"}


def test_winner_by_mean_val_acc_with_mean_and_std():
    lucky = summarise_candidate({"trial_id": "lucky", "within_budget": True},
                                [run(0, 0.99, 0.97), run(1000, 0.90, 0.91), run(2000, 0.91, 0.90)])
    steady = summarise_candidate({"trial_id": "steady", "within_budget": True},
                                 [run(0, 0.95, 0.95), run(1000, 0.95, 0.96), run(2000, 0.96, 0.95)])
    assert lucky["seeds"] == [0, 1000, 2000] and lucky["epochs"] == 20
    assert choose_winner([lucky, steady])["trial_id"] == "steady"  # one lucky seed does not win
    assert steady["test_acc_mean"] == pytest.approx(0.9533333) and steady["test_acc_std"] == pytest.approx(0.0057735, rel=1e-4)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert choose_winner([summarise_candidate({"trial_id": "x", "within_budget": True}, [])]) is None


def test_the_summary_names_a_candidate_whose_confirmation_runs_all_failed(capsys):
    from search.finish import print_result

    good = summarise_candidate({"trial_id": "good", "within_budget": True}, [run(0, 0.95, 0.95), run(1000, 0.96, 0.96)])
    failed = summarise_candidate({"trial_id": "failed", "within_budget": True}, [])
    final = {"trial_id": "good", "seeds": good["seeds"], "epochs": 20, M.VAL_ACC: good["val_acc_mean"],
             "val_acc_std": good["val_acc_std"], M.TEST_ACC: good["test_acc_mean"], "test_acc_std": good["test_acc_std"],
             M.TEACHER_VAL_ACC: 0.99, M.TEACHER_TEST_ACC: 0.98, M.STUDENT_PARAMS: 100, M.TEACHER_PARAMS: 2000,
             M.PARAM_RATIO: 0.05}
    print_result({"trial_id": "good", "within_budget": True}, {"lr_student": 0.1}, final, [good, failed],
                 "2 completed", {M.PARAM_RATIO: 0.1}, 12.0, Path("/x"), None)
    out = capsys.readouterr().out
    assert "* good" in out and "failed  no confirmation run finished 20 epochs" in out


def test_a_continuation_with_nothing_left_to_train_counts_the_trials_own_full_run(tmp_path, monkeypatch):
    """A candidate whose table row shows fewer epochs than its checkpoint holds (a result Tune lost) is continued from
    a full checkpoint: the continuation trains nothing and saves nothing, and the trial's own run is its seed's."""
    from types import SimpleNamespace

    import search.finish as finish

    own = tmp_path / "trial_a" / "checkpoint_000019" / "checkpoint.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    (tmp_path / "confirm" / "trial_c0").mkdir(parents=True)  # the continuation: no epoch, no checkpoint
    monkeypatch.setattr(finish, "evaluate_run", lambda ckpt, *a: {"seed": 0, "epochs": 20, "checkpoint": str(ckpt)})
    cand = {"trial_id": "a", "seeds": [0, 1000], "trial_dir": "trial_a", "epochs_run": 19}
    ctrials = [{"status": "TERMINATED", "run": {"candidate": "a", "seed": 0}, "dir": tmp_path / "confirm" / "trial_c0"}]
    plan = SimpleNamespace(path=str(tmp_path), folder=str(tmp_path), max_epochs=20, data_root=None, task_spec=None)
    runs = finish._confirmed_runs(plan, SimpleNamespace(model=None, data=None), cand, ctrials)
    assert [r["checkpoint"] for r in runs] == ["trial_a/checkpoint_000019/checkpoint.pt"]
