"""The search, for real, at smoke size: every space runs; ASHA stops become PRUNED; errors are
contained; interruption (Ctrl-C, SIGKILL) resumes to exactly num_samples trials; two-node cluster."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from trainable import metrics as M

SPACES = sorted((ROOT / "spaces").glob("*.yaml"))
pytestmark = pytest.mark.usefixtures("ray_address")


def search(*args) -> int:
    from search.run_search import main

    return main([str(a) for a in args])


def trials_table(exp: Path) -> pd.DataFrame:
    return pd.read_parquet(exp / "summary" / "trials.parquet")


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_runs(tmp_path, space):
    rc = search("--space", space, "--task", "digits", "--smoke", "--num-samples", 2, "--storage", tmp_path,
                "--no-report")
    assert rc == 0
    exp = tmp_path / space.stem
    trials = trials_table(exp)
    assert len(trials) == 2 and set(trials["outcome"]) <= {"completed", "stopped_early"}
    metrics = json.loads((exp / "best" / "metrics.json").read_text())
    assert set(metrics) == set(M.FINAL_METRICS)
    for name in ("student.pt", "config.json", "generated.png", "confusion_test.csv"):
        assert (exp / "best" / name).is_file()
    epochs = pd.read_parquet(exp / "summary" / "epochs.parquet")
    assert set(M.EPOCH_METRICS) <= set(epochs.columns)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    searched = [c for c in trials.columns if c.startswith("param.")]
    assert searched, "every searched hyperparameter gets a column"


def test_asha_stopped_trials_are_pruned_in_optuna(tmp_path):
    rc = search("--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--max-concurrent", 1,
                "--storage", tmp_path, "--name", "prune", "--no-report")
    assert rc == 0
    exp = tmp_path / "prune"
    study = json.loads((exp / "akdtune" / "study.json").read_text())
    stopped = set(json.loads((exp / "akdtune" / "asha_state.json").read_text())["stopped_trials"])
    assert stopped, "ASHA stopped no trial: the test needs at least one"
    by_ray = {t["ray_trial_id"]: t for t in study["trials"]}
    assert len(by_ray) == 6
    for trial_id, t in by_ray.items():
        if trial_id in stopped:
            assert t["state"] == "PRUNED"
            assert t["intermediate_values"], "pruned trials keep their intermediate values"
        else:
            assert t["state"] == "COMPLETE" and t["values"]
    trials = trials_table(exp)
    assert set(trials.loc[trials["outcome"] == "stopped_early", "trial_id"]) == stopped
    for trial_id in stopped:  # cut short: fewer epochs than the budget
        assert trials.loc[trials["trial_id"] == trial_id, "epochs_run"].item() < 3


def test_an_erroring_trial_does_not_stop_the_others(tmp_path):
    space = {"budget": {"num_samples": 6, "max_epochs": 2, "grace_period": 2},
             "fixed": {"momentum": 0.0, "weight_decay": 0.0},
             "params": {"lr_student": {"type": "categorical", "choices": [0.1, 1.0e30]}}}
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(space))
    rc = search("--space", tmp_path / "nan.yaml", "--smoke", "--num-samples", 6, "--max-concurrent", 1,
                "--max-failures", 0, "--storage", tmp_path, "--no-report")
    assert rc == 0
    trials = trials_table(tmp_path / "nan")
    errored = trials[trials["outcome"] == "errored"]
    assert len(trials) == 6 and 0 < len(errored) < 6
    assert errored["error"].str.contains("became nan|became inf").all()
    assert (errored["param.lr_student"] == 1.0e30).all()
    assert (trials.loc[trials["outcome"] != "errored", "param.lr_student"] == 0.1).all()


def test_existing_name_refused_without_resume(tmp_path):
    args = ["--space", ROOT / "spaces" / "ratios.yaml", "--smoke", "--num-samples", 1, "--storage", tmp_path,
            "--no-report"]
    assert search(*args) == 0
    before = (tmp_path / "ratios" / "summary" / "trials.parquet").read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "ratios" / "summary" / "trials.parquet").read_bytes() == before
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args[:-1]), "--name",
                        "other", "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def _start(args, address, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args),
                             "--address", address], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finished_trials(exp: Path) -> dict[str, str]:
    """Trials the search had finished, by Ray id, from the exported study."""
    try:
        study = json.loads((exp / "akdtune" / "study.json").read_text())
    except (OSError, ValueError):
        return {}
    return {t["ray_trial_id"]: t["state"] for t in study["trials"] if t["state"] != "RUNNING"}


def _wait_for(cond, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.5)
    return False


def _results(exp: Path, trial_id: str) -> list[dict]:
    lines = (exp / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in M.EPOCH_METRICS and k != M.IMAGES_PER_S}
            for line in lines]


def test_sigkill_mid_search_resumes_to_exactly_num_samples(tmp_path, ray_address):
    args = ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--storage", tmp_path,
            "--name", "killed", "--no-report"]
    exp = tmp_path / "killed"
    proc = _start(args, ray_address)
    try:
        assert _wait_for(lambda: len(_finished_trials(exp)) >= 2), "no trial finished in time"
        time.sleep(1.0)  # let Tune write an experiment checkpoint that includes them
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finished = _finished_trials(exp)
    asha_before = json.loads((exp / "akdtune" / "asha_state.json").read_text())
    # Tune's result.json may lose its last buffered lines in a SIGKILL; what was on disk must stay.
    before = {tid: _results(exp, tid) for tid in finished}
    checkpoints = {tid: sorted(p.name for p in (exp / f"trial_{tid}").glob("checkpoint_*")) for tid in finished}
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                        "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(exp)
    assert len(trials) == 6 and trials["trial_id"].is_unique
    assert set(trials["outcome"]) <= {"completed", "stopped_early"}
    for tid, rows in before.items():  # finished trials: results unchanged, not trained again
        assert _results(exp, tid)[:len(rows)] == rows
        assert sorted(p.name for p in (exp / f"trial_{tid}").glob("checkpoint_*")) == checkpoints[tid]
        final = asha_before["finished"][tid]
        row = trials[trials["trial_id"] == tid].iloc[0]
        assert row["final_val_acc"] == final["val_acc"] and row["epochs_run"] == final["epoch"]
    # ASHA's rung records from before the kill are all still there, with the same values.
    asha_after = json.loads((exp / "akdtune" / "asha_state.json").read_text())
    for (m, rec_before), (m2, rec_after) in zip(asha_before["rungs"][0], asha_after["rungs"][0]):
        assert m == m2
        for tid, value in rec_before.items():
            assert rec_after.get(tid) == pytest.approx(value)
    study = json.loads((exp / "akdtune" / "study.json").read_text())
    assert len(study["trials"]) == 6 and all(t["state"] in ("COMPLETE", "PRUNED") for t in study["trials"])


def test_ctrl_c_exits_3_and_the_printed_command_resumes(tmp_path, ray_address):
    args = ["--space", ROOT / "spaces" / "capacity.yaml", "--smoke", "--num-samples", 5, "--storage", tmp_path,
            "--name", "interrupted"]
    exp = tmp_path / "interrupted"
    proc = _start(args, ray_address)
    assert _wait_for(lambda: len(_finished_trials(exp)) >= 1), "no trial finished in time"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    command = out.split("Resume with:")[1].strip().splitlines()[0]
    assert command.startswith("python search/run_search.py") and command.endswith("--resume")
    assert "Partial: this search was interrupted" in (exp / "report.html").read_text()
    assert "unfinished" in set(trials_table(exp)["outcome"]) or len(trials_table(exp)) < 5
    r = subprocess.run([*command.replace("python", sys.executable, 1).split(), "--address", ray_address],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(exp)
    assert len(trials) == 5 and trials["trial_id"].is_unique and (trials["outcome"] != "unfinished").all()


def test_search_across_a_two_node_cluster(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
cluster.add_node(num_cpus=1)
import ray
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
from search.run_search import main
rc = main(["--space", {str(ROOT / "spaces" / "ratios.yaml")!r}, "--smoke", "--num-samples", "4", "--storage",
           {str(tmp_path)!r}, "--address", cluster.address, "--no-report"])
ray.shutdown()
cluster.shutdown()
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(tmp_path / "ratios")
    assert len(trials) == 4 and (trials["outcome"] != "errored").all()
