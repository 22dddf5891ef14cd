"""Results: Parquet schemas, a self-contained report, rendered for real in headless Chromium."""
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from base import metrics as M
from conftest import ROOT, run_cli, run_main
from results.summary import TRIAL_COLUMNS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, ray_address):
    from search.run_search import main

    storage = tmp_path_factory.mktemp("report")
    rc = main(["--space", str(ROOT / "spaces" / "loss.yaml"), "--smoke", "--num-samples", "4", "--max-concurrent",
               "1", "--storage", str(storage), "--name", "rep"])
    assert rc == 0
    return storage / "rep"


def test_parquet_schemas(finished_search):
    trials = pd.read_parquet(finished_search / "summary" / "trials.parquet")
    epochs = pd.read_parquet(finished_search / "summary" / "epochs.parquet")
    documented = {c for c in TRIAL_COLUMNS if not c.startswith("param.")}
    assert documented <= set(trials.columns)
    params = [c for c in trials.columns if c.startswith("param.")]
    assert {"param.student_loss", "param.generator_loss", "param.w_bn"} <= set(params)
    assert pd.api.types.is_string_dtype(trials["param.student_loss"]) and trials["param.w_bn"].dtype == "float64"
    assert trials["epochs_run"].dtype == "int64" and trials["within_budget"].dtype == bool
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert set(M.EPOCH_METRICS) <= set(epochs.columns)
    assert not epochs.duplicated(["trial_id", M.EPOCH]).any()
    assert epochs.groupby("trial_id").size().to_dict() == trials.set_index("trial_id")["epochs_run"].to_dict()
    for _, e in epochs.groupby("trial_id"):  # every epoch of every trial, none missing
        assert list(e[M.EPOCH]) == list(range(1, len(e) + 1))


def test_report_is_self_contained(finished_search):
    text = (finished_search / "report.html").read_text()
    assert "Search report" in text
    assert not re.search(r"<script[^>]+src=", text), "no remote (or any external) script"
    assert not re.search(r"<link[^>]+stylesheet", text), "no external stylesheet"
    assert not re.search(r"""<(img|iframe|script|link)[^>]+(src|href)=['"]?https?:""", text), "no remote resource"
    for title in ("Optimization history", "Parallel coordinates", "Parameter importances",
                  "Learning curves of every trial", "Confirmation over seeds", "Slice", "Accuracy versus student size", "Learning curves", "Confusion matrix", "Generated images",
                  "Size and inference cost", "All trials"):
        assert title in text, title


def test_the_verdict_is_at_the_top_and_the_generators_spread_in_the_header(finished_search):
    text = (finished_search / "report.html").read_text()
    best = json.loads((finished_search / "best" / "metrics.json").read_text())
    assert best[M.VERDICT] in ("reached", "below") and 0 < best[M.TEACHER_SHARE] <= 1.2
    verdict = re.search(r"<div class='verdict (reached|below)' id='verdict'>verdict: ([^<]*)</div>", text)
    assert verdict and verdict.group(1) == best[M.VERDICT]
    assert text.index("id='verdict'") < text.index("<table")  # above everything else on the page
    assert f"{best[M.TEACHER_SHARE]:.1%} of the teacher" in verdict.group(2).replace("&#x27;", "'")
    assert re.search(r"<th class='l'>generator</th><td>(COLLAPSED in|the teacher saw the generated images as)", text)


def test_optuna_plots_show_every_trial_at_one_stated_fidelity(finished_search):
    text = (finished_search / "report.html").read_text()
    trials = pd.read_parquet(finished_search / "summary" / "trials.parquet")
    assert (trials["outcome"] == "stopped_early").any(), "the fixture search needs a pruned trial"
    # smoke: grace 1, so every trial is compared at epoch 1, pruned ones included
    assert f"val_acc at epoch 1, the epoch every compared trial reached ({len(trials)} trials)" in text
    assert "Pareto front of full runs (3 epochs)" in text and "labels: epochs run" in text


def test_rebuilding_twice_gives_the_same_parquet(finished_search):
    before = {n: pd.read_parquet(finished_search / "summary" / f"{n}.parquet") for n in ("trials", "epochs")}
    r = run_cli("results/report.py", finished_search)
    assert r.returncode == 0, r.stderr
    for name, df in before.items():
        pd.testing.assert_frame_equal(df, pd.read_parquet(finished_search / "summary" / f"{name}.parquet"))


def test_a_result_that_tune_lost_to_a_kill_is_read_from_the_schedulers_record(finished_search, tmp_path):
    """Killed right after the scheduler stopped a trial at a rung: Tune's result.json may lack the epoch judged there;
    the trials table shows the result the rung judged (the scheduler records it before acting), not an older one."""
    from results.resultlog import result_log
    from results.schedule_record import scheduler_record
    from results.summary import load_experiment

    exp = tmp_path / "rep"
    shutil.copytree(finished_search, exp, symlinks=True)
    record = scheduler_record(exp / "akdtune" / "scheduler.json")
    cut = [t for t, d in record["stopped"].items() if d.get("reason") == "rung" and d["epoch"] > 1]
    done = list(record["finished"])
    assert cut or done
    for tid in cut + done:
        for f in (exp / f"trial_{tid}" / "result.json", result_log(exp, tid)):  # the kill came before the log's line
            lines = f.read_text().splitlines()
            f.write_text("\n".join(lines[:-1]) + "\n")  # its last result lost
    t = load_experiment(exp).trials.set_index("trial_id")
    for tid in cut:
        judged = record["stopped"][tid]
        assert t.loc[tid, "epochs_run"] == judged["epoch"] and t.loc[tid, "outcome"] == "stopped_early"
        assert t.loc[tid, "final_val_acc"] == judged["result"][M.VAL_ACC]
        assert t.loc[tid, "stopped_at"] == f"{judged['rung']}: {judged['position']} of {judged['of']}"
    for tid in done:
        assert t.loc[tid, "final_val_acc"] == record["finished"][tid][M.VAL_ACC]


def test_a_trial_folder_a_kill_left_before_tune_recorded_it_is_not_a_row(finished_search, tmp_path):
    """A folder the driver made just before a kill, unknown to Tune (the resumed search ran another trial in its place):
    the tables are those of the search without it, with the same column types; the folder is named as abandoned."""
    from results.summary import load_experiment

    exp = tmp_path / "rep"
    shutil.copytree(finished_search, exp, symlinks=True)
    before = load_experiment(exp)
    (exp / "trial_0badf00d").mkdir()
    (exp / "trial_0badf00d" / "params.json").write_text("{}")
    after = load_experiment(exp)
    assert after.abandoned == ("0badf00d",) and before.abandoned == ()
    pd.testing.assert_frame_equal(before.trials, after.trials)
    pd.testing.assert_frame_equal(before.epochs, after.epochs)
    assert not after.partial


def test_results_that_tune_lost_to_a_pause_are_read_from_the_searchs_own_log(finished_search, tmp_path):
    """Tune's result.json in the search folder is a copy its driver uploads now and then, copied back over newer lines
    when a paused trial resumes: lines go missing in the middle. The tables are the same without them."""
    from results.resultlog import read_result_lines, result_log
    from results.summary import load_experiment

    exp = tmp_path / "rep"
    shutil.copytree(finished_search, exp, symlinks=True)
    before = load_experiment(exp)
    for f in exp.glob("trial_*/result.json"):
        lines = f.read_text().splitlines()
        f.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % 2 == 0))  # every other line lost
    after = load_experiment(exp)
    pd.testing.assert_frame_equal(before.epochs, after.epochs)
    pd.testing.assert_frame_equal(before.trials.drop(columns=["_config"]), after.trials.drop(columns=["_config"]))
    for tid, n in before.trials.set_index("trial_id")["epochs_run"].items():
        assert [r[M.EPOCH] for r in read_result_lines(result_log(exp, tid))] == list(range(1, n + 1))


def test_the_summaries_and_the_report_build_where_ray_and_search_cannot_be_imported(finished_search, tmp_path):
    """A finished search folder is read from its files: results/ needs neither Ray nor search/ (e.g. on a laptop that
    has only pandas, Optuna and Plotly)."""
    exp = tmp_path / "rep"
    shutil.copytree(finished_search, exp, symlinks=True)
    (exp / "report.html").unlink()
    code = ("import runpy, sys; sys.modules['ray'] = None; sys.modules['search'] = None; "
            f"sys.argv = ['report.py', {str(exp)!r}]; runpy.run_path('results/report.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (exp / "report.html").is_file()
    mine = pd.read_parquet(exp / "summary" / "trials.parquet").drop(columns=["wall_s"])
    theirs = pd.read_parquet(finished_search / "summary" / "trials.parquet").drop(columns=["wall_s"])
    pd.testing.assert_frame_equal(mine, theirs)  # the same table as read in the search's own process
    # (that no file of results/ imports search/ or Ray is read from the sources: tests/test_architecture.py)


def test_report_cli_bad_path(tmp_path):
    r = run_main("results/report.py", tmp_path / "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr
    r = run_main("results/report.py", tmp_path)
    assert r.returncode == 2 and "not a Ray experiment folder" in r.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_in_headless_chromium(finished_search):
    report = finished_search / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--user-data-dir=" + str(finished_search / ".chromium"), "--virtual-time-budget=15000"]
    r = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180)
    dom = r.stdout
    assert 'data-report-ready="1"' in dom, r.stderr[-2000:]
    expected = int(re.search(r'data-plots-expected="(\d+)"', dom).group(1))
    rendered = int(re.search(r'data-plots-rendered="(\d+)"', dom).group(1))
    errors = json.loads(re.search(r"data-errors=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    # Eight plots at most; Optuna declines some on a thin study, and the report then says so in a note.
    declined = report.read_text().count("<p class='note'>not drawn:")
    assert expected + declined == 8 and expected >= 6 and rendered == expected, (expected, rendered, declined)
    assert errors == []
    shot = finished_search / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1300,6000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000  # next to the report, for people to look at


def test_the_method_comparison_plot_labels_feature_alignment():
    """A plot of accuracy by method appears when the method is searched; "+ features" where alignment was on."""
    from pathlib import Path

    from results.report import _method_plot, method_labels
    from results.summary import Experiment

    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "param.method": ["dfad", "avkd", "dafl", "dfad"],
        "param.w_feature": [0.0, 1.0, 0.0, 1.0], "final_val_acc": [0.9, 0.8, 0.95, 0.85], "epochs_run": [4, 4, 8, 8],
        "confirmed_test_acc_mean": [None, None, 0.96, None], "confirmed_test_acc_std": [None, None, 0.01, None]})
    epochs = pd.DataFrame({"trial_id": list("abcd") + ["c", "d"], M.EPOCH: [4, 4, 4, 4, 8, 8],
                           M.VAL_ACC: [0.9, 0.8, 0.9, 0.85, 0.95, 0.85]})
    e = Experiment(Path("/x"), {"grace_period": 4, "max_epochs": 8}, {}, {}, trials, epochs)
    assert list(method_labels(trials)) == ["dfad", "avkd + features", "dafl", "dfad + features"]
    html = _method_plot(e)
    assert "id=\"methods\"" in html and "val_acc at epoch 4" in html and "after all 8 epochs" in html
    assert _method_plot(Experiment(Path("/x"), {}, {}, {}, trials.drop(columns="param.method"), epochs)) is None
