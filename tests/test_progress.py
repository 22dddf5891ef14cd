"""The compact progress view: counts, ETA, best within the budget, plain lines off a terminal; the live report."""
import io
import pickle
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from base import metrics as M
from conftest import ROOT, bounded
from search.progress import SearchProgress, fmt_duration


def fake_trial(tid, status="RUNNING", last=None, config=None):
    return SimpleNamespace(trial_id=tid, status=status, last_result=last or {}, config=config or {"lr_student": 0.1})


def test_durations_read_as_a_person_writes_them():
    assert fmt_duration(59) == "59s" and fmt_duration(125) == "2m05s" and fmt_duration(3700) == "1h01m"


def test_plain_lines_with_eta_and_the_best_within_the_budget():
    out = io.StringIO()
    p = SearchProgress(4, 10, [2, 6], 3, {M.PARAM_RATIO: 0.1}, ["lr_student"])
    p.setup()
    p.stream = out
    trials = [fake_trial(t) for t in "abcd"]
    for epoch in (1, 2):
        for t, acc, ratio in (("a", 0.5, 0.05), ("b", 0.9, 0.5)):  # b is more accurate but over the budget
            r = {M.EPOCH: epoch, M.VAL_ACC: acc + epoch / 100, M.PARAM_RATIO: ratio, "time_this_iter_s": 2.0}
            p.on_trial_result(0, trials, trials["ab".index(t)], r)
    trials[0].last_result = {M.VAL_ACC: 0.52, M.PARAM_RATIO: 0.05}
    p.on_trial_complete(0, trials, trials[0])
    p.on_trial_error(0, trials, trials[1])
    text = out.getvalue()
    lines = text.strip().splitlines()
    assert lines[0].startswith("[1/4] trial a completed 2 epochs: val_acc 0.5200 params 5.0%  lr_student=0.1")
    assert "[2/4] trial b ERRORED" in text
    status = [ln for ln in lines if "done (" in ln]
    assert status and "ETA" in status[-1] and "best so far val_acc 0.5200 at 5.0% params (a)" in status[-1]
    assert "1 completed, 0 stopped early, 1 failed" in status[-1]
    assert not p.tty  # a StringIO is not a terminal: no bar, plain lines only


def test_a_resumed_search_counts_the_epochs_and_best_results_of_its_earlier_sessions(tmp_path):
    """After a resume the status line's best so far and epoch count include the trials finished before it (read
    from the scheduler's record and the search's own result log), as the trials table does."""
    from results.recordfile import write_record
    from results.resultlog import append_result
    from results.schedule_record import empty_scheduler_record

    state = empty_scheduler_record()
    state["finished"]["a"] = {M.EPOCH: 3, M.VAL_ACC: 0.95}
    state["stopped"]["b"] = {"reason": "rung", "rung": 1, "epoch": 1, "position": 2, "of": 2}
    state["order"] = ["a", "b", "c"]
    write_record(tmp_path / "akdtune" / "scheduler.json", state)
    for epoch, acc in ((1, 0.5), (2, 0.9), (3, 0.95)):
        append_result(tmp_path, "a", {M.EPOCH: epoch, M.VAL_ACC: acc, M.PARAM_RATIO: 0.05})
    for epoch, acc in ((1, 0.4), (2, 0.99)):  # b ran an epoch past its stop decision: it does not count
        append_result(tmp_path, "b", {M.EPOCH: epoch, M.VAL_ACC: acc, M.PARAM_RATIO: 0.05})
    append_result(tmp_path, "c", {M.EPOCH: 1, M.VAL_ACC: 0.3, M.PARAM_RATIO: 0.05})  # unfinished, resumes now
    p = SearchProgress(4, 3, [1], 3, {M.PARAM_RATIO: 0.1}, [], state_file=str(tmp_path / "akdtune" / "scheduler.json"))
    p.stream = io.StringIO()
    p.setup()
    p.stream = out = io.StringIO()
    trials = [fake_trial("c"), fake_trial("d")]
    p.on_trial_result(0, trials, trials[0], {M.EPOCH: 2, M.VAL_ACC: 0.6, M.PARAM_RATIO: 0.05})
    p.on_trial_complete(0, trials, trials[0])
    status = [ln for ln in out.getvalue().splitlines() if "done (" in ln][-1]
    assert "3/4 done (2 completed, 1 stopped early, 0 failed)" in status
    assert "| epochs 6 |" in status  # a: 3, b: 1 (its rung), c: 2
    assert "best so far val_acc 0.9500 at 5.0% params (a)" in status


def test_the_eta_shrinks_as_work_is_done():
    p = SearchProgress(4, 10, [], 3, None, [])
    p.setup()
    p.stream = io.StringIO()
    trials = [fake_trial("a"), fake_trial("b"), fake_trial("c", "PENDING"), fake_trial("d", "PENDING")]
    p.on_trial_result(0, trials, trials[0], {M.EPOCH: 1, M.VAL_ACC: 0.5, "time_this_iter_s": 1.0})
    first = p.eta_s(running=2)
    for e in range(2, 11):
        p.on_trial_result(0, trials, trials[0], {M.EPOCH: e, M.VAL_ACC: 0.5, "time_this_iter_s": 1.0})
    p.on_trial_complete(0, trials, trials[0])
    assert first == pytest.approx((40 - 1) * 1.0 / 2) and p.eta_s(running=2) == pytest.approx(30 * 1.0 / 2)


def test_the_callback_survives_pickling_as_plain_settings():
    import pickle

    p = SearchProgress(4, 10, [2], 3, {M.PARAM_RATIO: 0.1}, ["x"], state_file="/nowhere.json", report_dir=None)
    p.setup()
    q = pickle.loads(pickle.dumps(p))
    assert (q.num_samples, q.state_file, q.params) == (4, "/nowhere.json", ["x"]) and q.finished == {}


def _search(tmp_path, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "search" / "run_search.py"), "--space",
                             str(ROOT / "spaces" / "capacity.yaml"), "--smoke", "--num-samples", "4",
                             "--storage", str(tmp_path), "--name", "p", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_search_prints_a_few_lines_and_the_report_is_valid_while_it_runs(tmp_path, ray_address):
    proc = _search(tmp_path, "--address", ray_address, "--report-every", "0.2")
    report = tmp_path / "p" / "report.html"
    seen, reads = set(), 0
    while proc.poll() is None:
        if report.exists():
            text = report.read_text()
            reads += 1
            assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>"), "half-written report"
            seen.add("in progress" if "id='in-progress'" in text else "final")
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) <= 60, out
    assert any("ETA" in ln for ln in lines) and any("best so far val_acc" in ln for ln in lines)
    assert not any("Trial status" in ln or "│" in ln or "Checkpoint successfully created" in ln for ln in lines)
    assert not any(ln.startswith("[I ") for ln in lines), out  # nor Optuna's info lines
    assert "in progress" in seen and reads > 3
    assert "id='in-progress'" not in report.read_text()  # the final report says nothing of progress
    # capacity.yaml's sizes reach past its budget: those settings were refused before training, and said so
    import pandas as pd

    from results.limits import refused_over_budget

    trials = pd.read_parquet(tmp_path / "p" / "summary" / "trials.parquet")
    refused = refused_over_budget(str(tmp_path / "p" / "akdtune" / "study.journal"))
    assert len(trials) == 4 and trials["within_budget"].all() and refused >= 1
    assert f"{refused} proposed setting(s) over the budget refused before training" in out
    assert f"{refused} proposed settings over it were refused before training" in report.read_text()


@pytest.mark.slow
def test_verbose_brings_back_rays_output(tmp_path, ray_address):
    proc = _search(tmp_path, "--address", ray_address, "--verbose", "--no-report", "--confirm-top-k", "0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    # Tune's tables (printed on its own clock: a search this short may end between two) or the trials' own logs
    assert any(s in out for s in ("Trial status", "│", "Trial akd_trial_", "pid=")), out[-3000:]


def test_the_report_thread_stops_at_once_when_the_search_ends(tmp_path, monkeypatch):
    """A search's end never waits for the live report's next slot (it once waited the join's timeout)."""
    p = SearchProgress(2, 4, [], 3, None, [], report_dir=str(tmp_path), report_every_s=3600.0)
    p.setup()
    p.stream = io.StringIO()
    calls = []
    monkeypatch.setattr(SearchProgress, "on_progress", lambda self: calls.append(time.time()))
    trials = [fake_trial("a"), fake_trial("b")]
    p.on_trial_complete(0, trials, trials[0])  # first rewrite now
    time.sleep(0.3)
    p.on_trial_complete(0, trials, trials[1])  # the next one would wait an hour
    with bounded(60):
        p.on_experiment_end(trials)
    assert len(calls) == 1
    assert (tmp_path / "akdtune" / "live_report.json").exists()


def test_the_status_counts_settings_refused_over_the_budget(tmp_path):
    import optuna

    from results.journal import journal_storage
    from results.limits import OVER_BUDGET

    journal = tmp_path / "study.journal"
    study = optuna.create_study(study_name="akdtune", storage=journal_storage(journal))
    p = SearchProgress(4, 10, [2], 3, {M.PARAM_RATIO: 0.1}, ["x"], study_file=str(journal))
    p.setup()
    assert "refused" not in p.status(0)
    for _ in range(2):
        t = study.ask()
        t.set_user_attr(OVER_BUDGET, "params 30% of the teacher, over the budget of params <= 10% of the teacher")
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)  # pruned by a rung: not refused
    p.on_trial_start(0, [], None)  # refusals happen when a trial is proposed: counted as it starts
    assert p.status(0).endswith(" | 2 over the budget refused")
    q = pickle.loads(pickle.dumps(p))
    assert q.study_file == str(journal)
    missing = SearchProgress(4, 10, [2], 3, None, [], study_file=str(tmp_path / "none.journal"))
    missing.setup()
    assert "refused" not in missing.status(0)


def test_a_search_is_never_silent_for_long_while_trials_run():
    """Before any trial finished (the first minutes of a search): a status line once nothing was said for
    STATUS_EVERY_S, and none while something was, or when nothing runs."""
    from search import progress

    out = io.StringIO()
    p = SearchProgress(4, 10, [2, 6], 3, None, ["lr_student"])
    p.setup()
    p.stream = out
    trials = [fake_trial("a"), fake_trial("b", status="PENDING")]
    p.on_step_end(0, trials)
    assert out.getvalue() == ""  # just started
    p.on_trial_result(0, trials, trials[0], {M.EPOCH: 1, M.VAL_ACC: 0.3, M.PARAM_RATIO: 0.05, "time_this_iter_s": 7.0})
    p._last_line = time.time() - progress.STATUS_EVERY_S - 1
    p.on_step_end(0, trials)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and "0/4 done" in lines[0] and "1 running | epochs 1" in lines[0] and "ETA" in lines[0]
    p.on_step_end(0, trials)
    assert len(out.getvalue().strip().splitlines()) == 1  # just said
    p._last_line = 0.0
    p.on_step_end(0, [fake_trial("a", status="PENDING")])
    assert len(out.getvalue().strip().splitlines()) == 1  # nothing running: nothing to say
