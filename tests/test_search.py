"""The search, for real, at smoke size: every space runs; early stops become PRUNED; errors are
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

from base import metrics as M
from conftest import ROOT, users_teacher

SPACES = sorted((ROOT / "spaces").glob("*.yaml"))
pytestmark = [pytest.mark.usefixtures("ray_address"), pytest.mark.slow]


def search(*args) -> int:
    from search.run_search import main

    return main([str(a) for a in args])


def trials_table(exp: Path) -> pd.DataFrame:
    return pd.read_parquet(exp / "summary" / "trials.parquet")


def task_for(space: Path, tmp_path: Path) -> list:
    """The smoke task of a space: digits, or for a space that names a foreign teacher (an ImageNet recipe) a small
    folder of 32 px images with that teacher's weights, as a user would bring them."""
    teacher = (yaml.safe_load(space.read_text()).get("fixed") or {}).get("teacher", "")
    if ":" not in teacher:
        return ["--task", "digits"]
    import numpy as np
    import torch
    from PIL import Image

    from trainable.models import build_classifier

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    torch.save(build_classifier(teacher, 3, 3, 32).state_dict(), tmp_path / "teacher.pt")
    return ["--task", f"folder:{tmp_path / 'imgs'}", "--teacher", tmp_path / "teacher.pt"]


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_runs(tmp_path, space):
    rc = search("--space", space, *task_for(space, tmp_path), "--smoke", "--num-samples", 2, "--storage", tmp_path,
                "--no-report")
    assert rc == 0
    exp = tmp_path / space.stem
    trials = trials_table(exp)
    assert len(trials) == 2 and set(trials["outcome"]) <= {"completed", "stopped_early"}
    metrics = json.loads((exp / "best" / "metrics.json").read_text())
    assert set(M.FINAL_METRICS) <= set(metrics)
    assert metrics["epochs"] == 3 and len(metrics["seeds"]) == 2  # smoke: 3 epochs, 2 seeds
    for name in ("student.pt", "config.json", "generated.png", "confusion_test.csv"):
        assert (exp / "best" / name).is_file()
    epochs = pd.read_parquet(exp / "summary" / "epochs.parquet")
    assert set(M.EPOCH_METRICS) <= set(epochs.columns)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert set(epochs[M.TRAIN_THREADS]) == {1}  # --cpus-per-trial 1: one torch thread per trial, no oversubscription
    record = json.loads((exp / "akdtune" / "search.json").read_text())
    speed = record["speed"]
    assert record["estimate_s"] > 0 and record["wall_s"] > 0  # the estimate beside the real wall time
    assert speed["precision"] in ("fp32", "bf16") and speed["source"] in ("measured", "cached")
    assert metrics[M.PRECISION] == speed["precision"] and metrics[M.CHANNELS_LAST] == speed["channels_last"]
    searched = [c for c in trials.columns if c.startswith("param.")]
    assert searched, "every searched hyperparameter gets a column"


def study_trials(exp: Path) -> dict:
    """Optuna's trials of a search, by Ray id, read from the study's journal file like any user would."""
    import optuna

    from results.journal import journal_storage

    try:
        study = optuna.load_study(study_name="akdtune", storage=journal_storage(exp / "akdtune" / "study.journal"))
    except Exception:
        return {}
    # settings refused before training (over the budget) have no Ray trial
    return {t.user_attrs["ray_trial_id"]: t for t in study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs}


def scheduler_state(exp: Path) -> dict:
    return json.loads((exp / "akdtune" / "scheduler.json").read_text())


def test_early_stopped_trials_are_pruned_in_optuna(tmp_path):
    rc = search("--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--max-concurrent", 1,
                "--storage", tmp_path, "--name", "prune", "--no-report")
    assert rc == 0
    exp = tmp_path / "prune"
    stopped = set(scheduler_state(exp)["stopped"])
    assert stopped, "the scheduler stopped no trial: the test needs at least one"
    by_ray = study_trials(exp)
    assert len(by_ray) == 6
    for trial_id, t in by_ray.items():
        if trial_id in stopped:
            assert t.state.name == "PRUNED"
            assert t.intermediate_values, "pruned trials keep their intermediate values"
        else:
            assert t.state.name == "COMPLETE" and t.values
    trials = trials_table(exp)
    assert set(trials.loc[trials["outcome"] == "stopped_early", "trial_id"]) == stopped
    for trial_id in stopped:  # cut short: fewer epochs than the budget
        assert trials.loc[trials["trial_id"] == trial_id, "epochs_run"].item() < 3


def test_a_diverging_trial_is_a_result_not_the_best_and_not_retried(tmp_path):
    space = {"budget": {"num_samples": 6, "max_epochs": 2, "grace_period": 2},
             "fixed": {"momentum": 0.0, "weight_decay": 0.0},
             "params": {"lr_student": {"type": "categorical", "choices": [0.1, 1.0e30]}}}
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(space))
    rc = search("--space", tmp_path / "nan.yaml", "--smoke", "--num-samples", 6, "--max-concurrent", 1,
                "--max-failures", 3, "--storage", tmp_path, "--no-report")
    assert rc == 0
    trials = trials_table(tmp_path / "nan")
    diverged = trials[trials["outcome"] == "diverged"]
    assert len(trials) == 6 and 0 < len(diverged) < 6
    assert diverged["error"].str.contains("became nan|became inf").all()
    assert (diverged["param.lr_student"] == 1.0e30).all()
    assert (trials.loc[trials["outcome"] != "diverged", "param.lr_student"] == 0.1).all()
    assert (diverged["epochs_run"] == 0).all()  # not retried from a checkpoint: it diverged in its first epoch
    best = json.loads((tmp_path / "nan" / "best" / "trial.json").read_text())["trial_id"]
    assert trials.loc[trials["trial_id"] == best, "param.lr_student"].item() == 0.1
    states = {t.state.name for tid, t in study_trials(tmp_path / "nan").items() if tid in set(diverged["trial_id"])}
    assert states == {"FAIL"}


def test_a_search_where_no_trial_succeeds_exits_1_without_a_best(tmp_path, ray_address):
    space = {"budget": {"num_samples": 2, "max_epochs": 2, "grace_period": 2},
             "fixed": {"momentum": 0.0, "weight_decay": 0.0},
             "params": {"lr_student": {"type": "float", "low": 1.0e29, "high": 1.0e30}}}
    (tmp_path / "div.yaml").write_text(yaml.safe_dump(space))
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(tmp_path / "div.yaml"),
                        "--smoke", "--num-samples", "2", "--storage", str(tmp_path), "--address", ray_address],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no trial succeeded" in r.stdout
    exp = tmp_path / "div"
    assert not (exp / "best").exists()
    assert set(trials_table(exp)["outcome"]) == {"diverged"}
    html = (exp / "report.html").read_text()
    assert "none: no trial succeeded" in html and "became" in html


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
    """Trials the search had finished, by Ray id, from the scheduler's record."""
    try:
        st = scheduler_state(exp)
    except (OSError, ValueError):
        return {}
    return {**{t: "stopped" for t in st["stopped"]}, **{t: "finished" for t in st["finished"]}}


def _wait_for(cond, timeout=180, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(every)
    return False


def _killed_after_two_trials(args, address, exp: Path, finished: int = 2, at_once: bool = False) -> None:
    """A search started in its own process and killed (SIGKILL) once ``finished`` of its trials have finished
    (``at_once``: within 10 ms, before Tune may have saved them; else a second later, once it has)."""
    proc = _start(args, address)
    try:
        assert _wait_for(lambda: len(_finished_trials(exp)) >= finished or proc.poll() is not None,
                         every=0.01 if at_once else 0.5), "no trial in time"
        assert proc.poll() is None, proc.communicate()[0][-3000:]  # it did not end (or fail) before the kill
        if not at_once:
            time.sleep(1.0)  # let Tune write an experiment checkpoint that includes them
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def _results(exp: Path, trial_id: str) -> list[dict]:
    """A trial's results as the search recorded them (its own log: Tune's result.json in the search folder is an
    upload that a kill can leave missing for a trial that had finished)."""
    from results.resultlog import read_result_lines, result_log

    return [{k: v for k, v in r.items() if k in M.EPOCH_METRICS and k != M.IMAGES_PER_S}
            for r in read_result_lines(result_log(exp, trial_id))]


def test_sigkill_mid_search_resumes_to_exactly_num_samples(tmp_path, ray_address):
    args = ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--storage", tmp_path,
            "--name", "killed", "--no-report"]
    exp = tmp_path / "killed"
    proc = _start(args, ray_address)
    try:
        assert _wait_for(lambda: len(_finished_trials(exp)) >= 2), "no trial finished in time"
        # Another process (this one) reads the study while the search runs, with the trials' states so far.
        assert _wait_for(lambda: sum(t.state.name in ("COMPLETE", "PRUNED") for t in study_trials(exp).values()) >= 2)
        live = study_trials(exp)
        assert all(t.state.name in ("RUNNING", "COMPLETE", "PRUNED") for t in live.values())
        time.sleep(1.0)  # let Tune write an experiment checkpoint that includes them
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finished = _finished_trials(exp)
    state_before = scheduler_state(exp)
    # What the search had recorded of its finished trials must stay as it was.
    before = {tid: _results(exp, tid) for tid in finished}
    assert all(before.values()), before
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
        row = trials[trials["trial_id"] == tid].iloc[0]
        if tid in state_before["finished"]:
            final = state_before["finished"][tid]
            assert row["final_val_acc"] == final["val_acc"] and row["epochs_run"] == final["epoch"]
        else:
            assert row["outcome"] == "stopped_early"
    # The scheduler's rung records and decisions from before the kill are all still there, unchanged.
    state_after = scheduler_state(exp)
    for rung, records in state_before["rungs"].items():
        for tid, record in records.items():
            assert state_after["rungs"][rung][tid] == record
    assert set(state_before["stopped"]) <= set(state_after["stopped"])
    study, ids = study_trials(exp), set(trials["trial_id"])
    assert ids <= set(study) and all(study[t].state.name in ("COMPLETE", "PRUNED") for t in ids)
    # A setting proposed after Tune last saved its trials was proposed again in its place: the first proposal is
    # told FAIL (abandoned) in the study and is no trial of the table.
    assert all(t.state.name == "FAIL" for tid, t in study.items() if tid not in ids)


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_search_resumes_in_its_own_folder(tmp_path, ray_address, how):
    """cp -a or mv of an interrupted search folder, then --resume of the new folder (killed again, and resumed again):
    nothing is written outside it, the checkpoints of the trials made after the resume included; a copy's original
    is untouched (the same sha256 of every file) and resumes to the end on its own."""
    import hashlib
    import shutil

    def args(storage, resume=False):
        # one trial at a time: the next is made once one ends
        return ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 8, "--max-concurrent", 1,
                "--storage", storage, "--name", "s", "--no-report", *(["--resume"] if resume else [])]

    def digest(folder):
        return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
                if p.is_file()}

    src, dst = tmp_path / "a" / "s", tmp_path / "b" / "s"
    # most trials not yet made however fast this machine runs them: killed as soon as the first one has finished
    _killed_after_two_trials(args(tmp_path / "a"), ray_address, src, finished=1, at_once=True)
    made = {p.name for p in src.glob("trial_*")}
    assert len(made) < 8
    dst.parent.mkdir()
    if how == "copy":
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.move(src, dst)
    before = digest(src) if how == "copy" else {}

    def resume(storage):
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args(storage, True)),
                            "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr

    def finished_with_eight_trials(exp):
        trials = trials_table(exp)
        assert len(trials) == 8 and set(trials["outcome"]) <= {"completed", "stopped_early"}
        assert trials["winner"].sum() == 1 and (exp / "best" / "trial.json").is_file()
        for tid in trials["trial_id"]:  # every trial's checkpoints are in this folder
            assert list((exp / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt")), tid

    # The new folder: resumed, killed again once more trials finished, resumed again to the end.
    _killed_after_two_trials(args(tmp_path / "b", True), ray_address, dst, finished=len(_finished_trials(dst)) + 2)
    if how == "copy":
        assert digest(src) == before
    resume(tmp_path / "b")
    finished_with_eight_trials(dst)
    assert json.loads((dst / "akdtune" / "search.json").read_text())["folder"] == str(dst)
    study = study_trials(dst)  # every trial of the table finished in the study (which may also hold a trial whose
    # record Tune lost to a kill: the resumed search ran its setting again)
    assert all(study[t].state.name in ("COMPLETE", "PRUNED") for t in trials_table(dst)["trial_id"])
    if how == "move":
        assert not src.exists()  # no stray file recreated where it was
        return
    assert digest(src) == before  # the original: untouched, byte for byte
    assert {p.name for p in src.glob("trial_*")} == made
    resume(tmp_path / "a")  # and it finishes on its own, every one of its trials trained
    finished_with_eight_trials(src)


def test_damaged_records_are_refused_by_resume_and_report_and_repair_mends_a_cut_journal(tmp_path, ray_address):
    """An interrupted search whose records are damaged afterwards: --resume and results/report.py refuse in one line
    and change nothing; --repair mends a journal cut by a kill, and the search then resumes to the end."""
    import shutil

    from conftest import run_main

    def args(name):
        return ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 5, "--storage", tmp_path,
                "--name", name, "--no-report"]

    src = tmp_path / "s"
    _killed_after_two_trials(args("s"), ray_address, src)  # its driver.lock stays (not a record: never compared)
    def cut_journal(e, keep):
        journal = e / "akdtune" / "study.journal"
        journal.write_bytes(keep(journal.read_bytes()))

    def half_the_lines(b: bytes) -> bytes:  # head -n half, and at least the last trial's naming of its Ray trial gone
        lines = b.splitlines(keepends=True)
        last_named = max(i for i, line in enumerate(lines) if b"ray_trial_id" in line)
        return b"".join(lines[:min(len(lines) // 2, last_named)])

    def emptied(pattern):
        return lambda e: sorted(e.glob(pattern))[-1].write_bytes(b"")

    damages = {
        "journal": lambda e: cut_journal(e, lambda b: b[:-7]),  # its last record cut short, as by a kill
        "journal-at-a-line": lambda e: cut_journal(e, half_the_lines),  # records gone, cut at a line boundary
        "journal-half": lambda e: cut_journal(e, lambda b: half_the_lines(b) + b'{"op_code": 4, "wo'),  # and a cut one
        "scheduler": lambda e: (e / "akdtune" / "scheduler.json").write_text("{"),
        "scheduler-emptied": lambda e: (e / "akdtune" / "scheduler.json").write_text("{}"),
        "search-emptied": lambda e: (e / "akdtune" / "search.json").write_text("{}"),
        "record": lambda e: (e / "akdtune" / "search.json").unlink(),
        "experiment-state": emptied("experiment_state-*.json"),  # Tune's state files, 0 bytes
        "search-generator": emptied("search_gen_state-*.json"),
        "callbacks": emptied("callback-states-*.pkl"),
        "tune-files": lambda e: (emptied("searcher-state-*.pkl")(e), emptied("trial_*/params.json")(e)),
    }
    needles = {"journal": "study.journal is damaged (its last record is cut short",
               "journal-at-a-line": "study.journal is damaged (it holds ",
               "journal-half": "study.journal is damaged (its last record is cut short",
               "scheduler": "scheduler.json is damaged (not valid JSON",
               "scheduler-emptied": "scheduler.json is damaged (it has no checksum",
               "search-emptied": "search.json is damaged (it has no checksum",
               "record": "search.json is missing",
               "experiment-state": "is damaged (Tune's experiment state is empty",
               "search-generator": "search_gen_state-", "callbacks": "callback-states-",
               "tune-files": "is damaged (Tune's copy of the"}
    for name, damage in damages.items():
        exp = tmp_path / name
        shutil.copytree(src, exp, symlinks=True)
        damage(exp)
        before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file() and p.name != "driver.lock"}
        for script, argv in (("results/report.py", [exp]), ("search/run_search.py", [*args(name), "--resume"])):
            r = run_main(script, *argv)
            assert r.returncode == 2 and needles[name] in r.stderr, (script, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr + r.stdout
            assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file() and p.name != "driver.lock"} == before, script
        if name in ("journal-at-a-line", "journal-half", "experiment-state", "scheduler-emptied"):
            r = run_main("search/run_search.py", *args(name), "--resume", "--repair")  # nothing to rebuild it from
            assert r.returncode == 2 and "restore it from a copy of the search folder" in r.stderr, r.stderr
            assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file() and p.name != "driver.lock"} == before
    for name, said in (("journal", "repaired akdtune/study.journal: dropped a cut last record ("),
                       ("tune-files", "made again from the scheduler's order of the")):
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args(name)), "--resume",
                            "--repair", "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert said in r.stdout
        trials = trials_table(tmp_path / name)
        assert len(trials) == 5 and set(trials["outcome"]) <= {"completed", "stopped_early"}
        assert trials["winner"].sum() == 1 and trials["trial_id"].is_unique
        assert run_main("results/report.py", tmp_path / name).returncode == 0


def _small_filesystem(path: Path, size: str) -> bool:
    """A tmpfs of ``size`` mounted at ``path`` (False where this machine does not allow it)."""
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_the_search_in_one_line_and_the_printed_command_finishes_it(tmp_path, ray_address):
    """A search whose storage fills up: one line naming the full filesystem and the command to run, exit 3, no
    traceback; every record whole; once there is room, that command finishes the search with every trial."""
    import shlex

    disk = tmp_path / "disk"
    if not _small_filesystem(disk, "3m"):
        pytest.skip("mounting a small tmpfs is not allowed on this machine")
    try:
        args = ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--storage", disk,
                "--name", "s", "--no-report"]
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--address",
                            ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
        said = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(said) == 1 and said[0].startswith(f"error: no space left on {disk}"), r.stderr[-3000:]
        from results.checks import check_records

        assert check_records(disk / "s") == []  # every record whole
        command = said[0].split("free space and run: ", 1)[1]
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0  # room again
        again = subprocess.run([sys.executable, *shlex.split(command)[1:], "--address", ray_address],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        trials = trials_table(disk / "s")
        assert len(trials) == 6 and trials["trial_id"].is_unique and trials["winner"].sum() == 1
        assert set(trials["outcome"]) <= {"completed", "stopped_early"}  # none errored by the full disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_trial_whose_worker_dies_is_errored_and_the_search_finishes_with_the_others(tmp_path, ray_address):
    """kill -9 of a trial's worker with --max-failures 0: that trial is errored (never "best so far"), the others
    finish, the best of them is confirmed and exported, exit 0, one line about the crash and no Ray traceback."""
    space = {"budget": {"num_samples": 3, "max_epochs": 40, "grace_period": 40, "confirm_top_k": 1, "confirm_seeds": 1},
             "fixed": {"iters_per_epoch": 4, "batch_size": 32, "eval_batch_size": 512},
             "params": {"lr_student": {"type": "float", "low": 0.05, "high": 0.2, "log": True}}}
    (tmp_path / "slowish.yaml").write_text(yaml.safe_dump(space))
    exp = tmp_path / "slowish"
    proc = _start(["--space", tmp_path / "slowish.yaml", "--storage", tmp_path, "--max-failures", 0, "--no-report",
                   "--max-concurrent", 2], ray_address)

    def a_running_trials_pid():
        for f in exp.glob("trial_*/result.json"):
            lines = f.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("epoch", 0) >= 2:
                return f.parent.name.removeprefix("trial_"), json.loads(lines[-1])["pid"]
        return None

    assert _wait_for(a_running_trials_pid), "no trial reported in time"
    victim, pid = a_running_trials_pid()
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "Trial task failed" not in out
    assert f"trial {victim} ERRORED" in out and "1 errored" in out
    assert f"({victim})" not in out.split(f"trial {victim} ERRORED")[1]  # never "best so far" after it died
    trials = trials_table(exp).set_index("trial_id")
    assert trials.loc[victim, "outcome"] == "errored" and "the worker died" in trials.loc[victim, "error"]
    assert (trials["outcome"] == "completed").sum() == 2 and not trials.loc[victim, "winner"]
    assert json.loads((exp / "best" / "trial.json").read_text())["trial_id"] != victim


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


def test_an_asynchronous_search_numbers_its_trials_in_the_order_they_were_proposed(tmp_path, ray_address):
    assert search("--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 3, "--asynchronous",
                  "--storage", tmp_path, "--name", "a", "--no-report") == 0
    trials = trials_table(tmp_path / "a")
    assert list(trials["trial"]) == [0, 1, 2] and trials["trial_id"].is_unique


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


def _epochs_reported(exp: Path, trial_id: str) -> list[int]:
    path = exp / f"trial_{trial_id}" / "result.json"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if M.EPOCH in r:
            out.append(int(r[M.EPOCH]))
    return out


def test_sigkill_right_after_a_stop_decision_never_trains_that_trial_again(tmp_path, ray_address):
    """Kill the driver the moment the scheduler has written a stop decision, before Tune acts on it."""
    args = ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 6, "--storage", tmp_path,
            "--name", "stopkill", "--no-report", "--confirm-top-k", 0]
    exp = tmp_path / "stopkill"
    state = exp / "akdtune" / "scheduler.json"
    proc = _start(args, ray_address)
    stopped = {}
    try:
        end = time.time() + 240
        while time.time() < end and not stopped:
            try:
                stopped = json.loads(state.read_text())["stopped"]
            except (OSError, ValueError, KeyError):
                pass
            if not stopped:
                time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert stopped, "the scheduler stopped no trial in time"
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                        "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(exp)
    # A folder the driver made just before the kill, unknown to Tune, is not a trial of the table.
    assert len(trials) == 6 and trials["trial_id"].is_unique
    for tid, decision in stopped.items():
        epochs = _epochs_reported(exp, tid)  # may be empty: the kill can beat Tune's write of the stopping result
        assert max(epochs, default=0) <= decision["epoch"], f"trial {tid} stopped at {decision['epoch']} trained on: {epochs}"
        assert trials.loc[trials["trial_id"] == tid, "outcome"].item() == "stopped_early"
        assert study_trials(exp)[tid].state.name == "PRUNED"


def test_sigkill_during_confirmation_resumes_with_the_same_runs(tmp_path, ray_address):
    args = ["--space", ROOT / "spaces" / "capacity.yaml", "--smoke", "--num-samples", 3, "--storage", tmp_path,
            "--name", "confirmkill", "--no-report", "--confirm-top-k", 2, "--confirm-seeds", 3,
            "--max-concurrent", 1]
    exp = tmp_path / "confirmkill"

    def confirm_results():
        return [p for p in (exp / "confirm").glob("trial_*/result.json") if p.stat().st_size > 0]

    proc = _start(args, ray_address)
    try:
        assert _wait_for(lambda: len(confirm_results()) >= 1, timeout=300), "confirmation did not start in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    plan = json.loads((exp / "akdtune" / "confirm.json").read_text())
    assert not (exp / "akdtune" / "confirmed.json").exists()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                        "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((exp / "akdtune" / "confirm.json").read_text()) == plan  # the same plan, not re-ranked
    from ray.tune import ExperimentAnalysis

    ctrials = ExperimentAnalysis(str(exp / "confirm")).trials
    runs = sorted((t.config["run"]["candidate"], t.config["run"]["seed"]) for t in ctrials)
    assert runs == sorted((r["candidate"], r["seed"]) for r in plan["runs"])  # the same runs, no duplicates
    assert all(t.status == "TERMINATED" for t in ctrials)
    confirmed = json.loads((exp / "akdtune" / "confirmed.json").read_text())
    for cand in confirmed["candidates"]:
        assert [r["epochs"] for r in cand["runs"]] == [3, 3, 3] and len(set(cand["seeds"])) == 3
    metrics = json.loads((exp / "best" / "metrics.json").read_text())
    winner = next(c for c in confirmed["candidates"] if c["trial_id"] == confirmed["winner"])
    assert metrics["test_acc"] == pytest.approx(winner["test_acc_mean"]) and metrics["seeds"] == winner["seeds"]
    assert len(trials_table(exp)) == 3


def test_a_finished_search_resumed_says_so_and_changes_nothing(tmp_path):
    args = ["--space", ROOT / "spaces" / "ratios.yaml", "--smoke", "--num-samples", 2, "--storage", tmp_path,
            "--no-report"]
    assert search(*args) == 0
    exp = tmp_path / "ratios"
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "is finished" in r.stdout
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("kill_state", ["partial export", "empty best of an older version", "confirmation starting",
                                        "summaries not yet written"])
def test_a_kill_during_the_winners_export_or_the_confirmation_resumes_to_a_complete_best(tmp_path, kill_state):
    args = ["--space", ROOT / "spaces" / "ratios.yaml", "--smoke", "--num-samples", 2, "--storage", tmp_path,
            "--no-report"]
    assert search(*args) == 0
    exp = tmp_path / "ratios"
    complete = sorted(p.name for p in (exp / "best").iterdir())
    winner = json.loads((exp / "best" / "trial.json").read_text())
    assert not Path(winner["checkpoint"]).is_absolute() and (exp / winner["checkpoint"]).is_file()
    # The states a kill at some moment of the export leaves: best/ still being written (it is written under
    # akdtune/ and renamed when complete), or, from an older version, a best/ folder made before its files.
    if kill_state == "partial export":
        (exp / "best").rename(exp / "akdtune" / "best.partial")
        (exp / "akdtune" / "best.partial" / "metrics.json").unlink()
    elif kill_state == "summaries not yet written":  # best/ renamed into place, the summaries still those before it
        table = exp / "summary" / "trials.parquet"
        before_export = pd.read_parquet(table).assign(winner=False)
        before_export.to_parquet(table, index=False)
        os.utime(table, (0, 0))
    elif kill_state == "confirmation starting":  # Tune had written the confirmation's tuner.pkl, no state yet
        import shutil

        for p in [*exp.glob("confirm/*state*"), exp / "akdtune" / "confirmed.json"]:
            p.unlink()
        shutil.rmtree(exp / "best")
    else:
        import shutil

        shutil.rmtree(exp / "best")
        (exp / "best").mkdir()
    assert search(*args, "--resume") == 0
    assert sorted(p.name for p in (exp / "best").iterdir()) == complete
    assert json.loads((exp / "best" / "trial.json").read_text())["trial_id"] == winner["trial_id"]
    assert not (exp / "akdtune" / "best.partial").exists()
    assert trials_table(exp)["winner"].sum() == 1


USER_TEACHER = '''
import torch.nn as nn


class DigitsNet(nn.Module):
    """A teacher class of the user's own, for 1 x 8 x 8 digits."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))
'''


def test_a_search_with_the_users_own_teacher_class_runs_end_to_end(tmp_path, ray_address):
    """--teacher-model mymodule:Class --teacher w.pt, from the user's folder: the trials import the class there."""
    myteacher = users_teacher(tmp_path, "myteacher", USER_TEACHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(ROOT / "spaces" / "capacity.yaml"),
                        "--teacher-model", "myteacher:DigitsNet", "--teacher", "w.pt", "--smoke", "--num-samples", "2",
                        "--storage", "runs", "--no-report", "--address", ray_address],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    exp = tmp_path / "runs" / "capacity"
    record = json.loads((exp / "akdtune" / "search.json").read_text())
    assert record["teacher_model"] == "myteacher:DigitsNet" and record["teacher_arch"] == "myteacher:DigitsNet"
    metrics = json.loads((exp / "best" / "metrics.json").read_text())
    assert metrics["teacher_params"] == sum(p.numel() for p in myteacher.DigitsNet(10).parameters())
    assert metrics["param_ratio"] <= 0.10  # the space's budget, against the user's teacher
    # A class that does not exist is refused before Ray starts, in one line, with nothing written.
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(ROOT / "spaces" / "capacity.yaml"),
                        "--teacher-model", "myteacher:Nope", "--teacher", "w.pt", "--smoke", "--storage", "runs",
                        "--name", "nope"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "has no callable 'Nope'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "runs" / "nope").exists()


FAILS_ONCE = USER_TEACHER.replace("import torch.nn as nn\n", """import torch.nn as nn
import ray
from pathlib import Path

MARK = Path(MARK_PATH)  # while it exists, the first trial to run the teacher crashes (and takes the mark)
""").replace("    def forward(self, x):\n", """    def forward(self, x):
        if ray.get_runtime_context().get_actor_id() is not None and MARK.exists():  # in a trial, not the driver
            try:
                MARK.unlink()
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError("this trial's worker crashed")
""")


def test_a_resume_retries_the_trials_that_errored_for_good(tmp_path, ray_address):
    """A trial that crashed with no retry left (--max-failures 0) is errored; the search, killed before its end and
    resumed, says so in one line and trains it again: every trial then completed or stopped, none errored."""
    mark = tmp_path / "fail-once"
    mark.touch()
    users_teacher(tmp_path, "flaky", f"MARK_PATH = {str(mark)!r}\n{FAILS_ONCE}")
    args = ["--space", ROOT / "spaces" / "capacity.yaml", "--teacher-model", "flaky:DigitsNet", "--teacher", "w.pt",
            "--smoke", "--num-samples", 6, "--max-failures", 0, "--storage", tmp_path / "runs", "--no-report"]
    exp = tmp_path / "runs" / "capacity"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--address",
                             ray_address], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert _wait_for(lambda: _errored(exp) or proc.poll() is not None), "no trial errored in time"
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(1.0)  # let Tune write an experiment checkpoint that has it errored
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    errored = _errored(exp)
    assert len(errored) == 1 and not mark.exists()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                        "--address", ray_address], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"retrying 1 errored trial(s) from their last checkpoint, with --max-failures 0 retries again: " \
           f"{errored[0]}" in r.stdout
    trials = trials_table(exp)
    assert len(trials) == 6 and set(trials["outcome"]) <= {"completed", "stopped_early"}
    assert errored[0] in set(trials["trial_id"]) and not _errored(exp)
    # the study ends with the retry's outcome, as the table does (its FAIL record stays, the older one)
    from results.journal import open_study
    from results.study import newest_records

    study = {t.user_attrs["ray_trial_id"]: t.state.name for t in newest_records(open_study(exp / "akdtune" /
                                                                                            "study.journal"))
             if "ray_trial_id" in t.user_attrs}
    words = {"completed": "COMPLETE", "stopped_early": "PRUNED"}  # (a setting asked just before the kill: abandoned)
    assert {t: study[t] for t in trials["trial_id"]} == {t: words[o] for t, o in zip(trials["trial_id"],
                                                                                       trials["outcome"])}


def _errored(exp: Path) -> list[str]:
    try:
        return list(scheduler_state(exp).get("errored") or {})
    except (OSError, ValueError):
        return []


def test_a_search_with_an_exported_program_as_its_teacher(tmp_path, digits_teacher):
    """A .pt2 teacher (what a search exports as best/student.pt2): no code and no weights file; trials load it."""
    import torch

    x = torch.zeros(2, 1, 8, 8)
    program = torch.export.export(digits_teacher.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(tmp_path / "teacher.pt2"))
    rc = search("--space", ROOT / "spaces" / "lr.yaml", "--teacher-model", tmp_path / "teacher.pt2", "--smoke",
                "--num-samples", 2, "--storage", tmp_path, "--no-report")
    assert rc == 0
    metrics = json.loads((tmp_path / "lr" / "best" / "metrics.json").read_text())
    assert metrics["teacher_params"] == sum(p.numel() for p in digits_teacher.parameters())
    assert metrics["teacher_test_acc"] > 0.9  # the program is the trained teacher


# ------------------------------------------------------------------ the same command, the same search
REPEAT_ARGS = ["--space", ROOT / "spaces" / "capacity.yaml", "--smoke", "--num-samples", 8, "--max-concurrent", 2,
               "--seed", 3, "--no-report"]
# What may differ between two runs of one command: Ray's random ids, times, and the CPU timing of the export.
VARYING = ["trial_id", "wall_s", "latency_ms_b1", "throughput_b256", "cpu_threads", "size_bytes"]


def _same_search(a: Path, b: Path) -> None:
    ta, tb = trials_table(a).drop(columns=VARYING), trials_table(b).drop(columns=VARYING)
    pd.testing.assert_frame_equal(ta, tb)
    ma, mb = (json.loads((e / "best" / "metrics.json").read_text()) for e in (a, b))
    for key in ("val_acc", "val_acc_std", "test_acc", "test_acc_std", "student_test_acc", "param_ratio", "seeds"):
        assert ma[key] == mb[key], key
    for e in (a, b):  # every epoch of every trial is in the tables, none lost to a pause
        for _, g in pd.read_parquet(e / "summary" / "epochs.parquet").groupby("trial_id"):
            assert list(g[M.EPOCH]) == list(range(1, len(g) + 1))


def test_the_same_command_gives_the_same_search_with_trials_in_parallel(tmp_path, ray_address):
    """Two trials at a time: the settings, every rung decision, every trial's metrics and the winner are the same
    from run to run; and a run killed (kill -9) mid-search and resumed ends with the same table and winner."""
    assert search(*REPEAT_ARGS, "--storage", tmp_path, "--name", "a") == 0
    assert search(*REPEAT_ARGS, "--storage", tmp_path, "--name", "b") == 0
    table = trials_table(tmp_path / "a")
    assert list(table["trial"]) == list(range(8))  # the table's order: the order settings were proposed
    _same_search(tmp_path / "a", tmp_path / "b")
    _killed_after_two_trials([*REPEAT_ARGS, "--storage", tmp_path, "--name", "c"], ray_address, tmp_path / "c")
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, REPEAT_ARGS), "--storage",
                        str(tmp_path), "--name", "c", "--resume", "--address", ray_address],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _same_search(tmp_path / "a", tmp_path / "c")
    # what was held back is deleted once a search has ended: Tune's two newest checkpoints of each trial are left
    assert all(len(list(d.glob("checkpoint_*"))) <= 2 for d in (tmp_path / "a").glob("trial_*"))


TUNE_STATE_PREFIXES = (".experiment_state-", ".search_gen_state-", ".searcher-state-", ".callback-states-")


def _tmp_files(exp: Path) -> bool:
    """A live writer is in the middle of copying one of Tune's state files into the search folder (each is written
    as ``.<name>.<pid>.tmp<suffix>`` first and moved into place; one a killed writer left behind does not count)."""
    import re

    with os.scandir(exp) as entries:  # cheap enough to poll every millisecond: a copy lasts about that long
        names = [e.name for e in entries if e.name.startswith(TUNE_STATE_PREFIXES)]
    for name in names:
        m = re.fullmatch(r"\..*\.(\d+)\.tmp.*", name)
        if m and Path(f"/proc/{m.group(1)}").exists():
            return True
    return False


def _finished_count(exp: Path) -> int:
    return len(_finished_trials(exp))


def _stops(exp: Path) -> int:
    try:
        return len(scheduler_state(exp)["stopped"])
    except (OSError, ValueError, KeyError):
        return 0


# Ten moments of one search, each the first moment at which it is killed (kill -9) in one session of it.
KILL_MOMENTS = [
    ("a trial folder is made", lambda e: any(e.glob("trial_*"))),
    ("the first trial finished", lambda e: _finished_count(e) >= 1),
    ("inside a copy of Tune's state", _tmp_files),
    ("three trials finished", lambda e: _finished_count(e) >= 3),
    ("right after a stop decision", lambda e: _stops(e) >= 3),
    ("inside another copy", _tmp_files),
    ("six trials finished", lambda e: _finished_count(e) >= 6),
    ("the confirmation started", lambda e: (e / "confirm").is_dir()),
    ("the winner's export", lambda e: (e / "akdtune" / "best.partial").exists()),
    ("between the export and the summaries", lambda e: (e / "best" / "trial.json").is_file()),
]


def test_a_search_killed_at_ten_moments_and_resumed_each_time_is_the_uninterrupted_search(tmp_path, ray_address):
    """kill -9 at ten moments spread over one search (inside Tune's state copies and between the export and the
    summaries included), each followed by --resume: exactly N trials, none twice, and the same trials table and
    winner as the search run without a break."""
    assert search(*REPEAT_ARGS, "--storage", tmp_path, "--name", "whole") == 0
    exp, args = tmp_path / "k", [*REPEAT_ARGS, "--storage", tmp_path, "--name", "k"]
    killed, ended, repair, moments = [], [], [], list(KILL_MOMENTS)
    while moments:
        moment, reached = moments[0]
        resume = ["--resume", *(["--repair"] if repair else [])] if (exp / "tuner.pkl").exists() else []
        proc = _start([*args, *resume], ray_address)
        try:
            end = time.time() + 300
            while time.time() < end and proc.poll() is None and not reached(exp):
                time.sleep(0.001 if reached is _tmp_files else 0.05)  # a copy of Tune's state lasts milliseconds
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed.append(moment)
            out = proc.communicate()[0]
        assert "Traceback" not in out, (moment, out[-3000:])
        if proc.returncode == 2 and "--repair" in out and not repair:
            repair = [moment]  # a kill cut the study journal's last record: the line says to resume with --repair,
            continue  # and so the same moment is tried again as a user would resume
        if proc.returncode not in (-signal.SIGKILL, 0):
            ended.append((moment, proc.returncode, out[-2000:]))
        moments.pop(0)
        repair = []
    assert not ended, ended
    assert len(killed) >= 6, killed  # most moments came while the search ran (a fast machine may pass a few)
    for extra in ([], ["--repair"]):  # --repair only where the resume's line asks for it (a cut journal record)
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                            *extra, "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
        if not (r.returncode == 2 and "--repair" in r.stderr):
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(exp)
    assert len(trials) == 8 and trials["trial_id"].is_unique and list(trials["trial"]) == list(range(8))
    _same_search(tmp_path / "whole", exp)


def _waiting_trial(config):
    """Reports epochs 1..6 with a checkpoint each, resuming from its checkpoint; ``resumed_at``: where it started."""
    import tempfile

    from ray import tune

    start, ckpt = 0, tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "epoch.json").read_text())["epoch"]
    for epoch in range(start + 1, 7):
        time.sleep(config["p"]["sleep"])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({M.EPOCH: epoch, M.VAL_ACC: config["p"]["acc"] + epoch / 100, "resumed_at": start},
                        checkpoint=tune.Checkpoint.from_directory(d))


def test_a_trial_paused_at_its_rung_resumes_from_its_checkpoint_and_every_result_is_logged(tmp_path):
    """Tune for real: the faster of two trials reaches the rung first, is paused until the earlier one is there, ranked,
    and resumed from its checkpoint; the search's own log holds every result of both (Tune's result.json can lose
    the lines reported just before a pause, which the trials table then never sees)."""
    from ray import cloudpickle, tune

    from results.resultlog import read_result_lines, result_log
    from search.callbacks import ResultLog
    from search.scheduler import RungScheduler

    class InOrder(RungScheduler):  # the searcher sets the order in a search; here the trials' order of creation
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            self.set_order([*(self.state.get("order") or []), trial.trial_id])

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    exp = tmp_path / "x"
    scheduler = InOrder([(M.VAL_ACC, "max")], max_epochs=6, grace_period=3, reduction_factor=2,
                        state_file=str(exp / "akdtune" / "scheduler.json"), repeatable=True)
    slow, fast = {"sleep": 0.6, "acc": 0.5}, {"sleep": 0.05, "acc": 0.9}
    tune.Tuner(tune.with_resources(_waiting_trial, {"cpu": 1}), param_space={"p": tune.grid_search([slow, fast])},
               tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=2),
               run_config=tune.RunConfig(name="x", storage_path=str(tmp_path), verbose=0,
                                         callbacks=[ResultLog(str(exp))])).fit()
    first, second = scheduler.state["order"]
    logged = {t: read_result_lines(result_log(exp, t)) for t in (first, second)}
    assert [r[M.EPOCH] for r in logged[first]] == [1, 2, 3, 4, 5, 6]
    assert [r[M.EPOCH] for r in logged[second]] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_at"] for r in logged[first]] == [0] * 6  # never waited
    assert [r["resumed_at"] for r in logged[second]] == [0, 0, 0, 3, 3, 3]  # paused at its rung, went on from there
    assert scheduler.stopped == {} and scheduler.state["waiting"] == {}


def test_damage_to_the_winner_is_found_by_report_and_resume_and_repair_exports_it_again(tmp_path, ray_address):
    """A flipped byte in best/student.pt, or the winner's checkpoint deleted, in a finished search: both refused in
    one line by results/report.py and --resume (checked against best/manifest.json), nothing changed; --repair
    exports the winner again from its checkpoint, the same metrics."""
    import shutil

    from conftest import run_main

    def args(name):
        return ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 3, "--storage", tmp_path,
                "--name", name, "--no-report"]

    assert search(*args("s")) == 0
    src = tmp_path / "s"
    manifest = json.loads((src / "best" / "manifest.json").read_text())
    assert {"student.pt", "student.pt2", "metrics.json", "trial.json"} <= set(manifest["files"])
    before = json.loads((src / "best" / "metrics.json").read_text())

    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped, symlinks=True)
    data = bytearray((flipped / "best" / "student.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "best" / "student.pt").write_bytes(bytes(data))
    files = {p: p.read_bytes() for p in flipped.rglob("*") if p.is_file()}
    for script, argv in (("results/report.py", [flipped]), ("search/run_search.py", [*args("flipped"), "--resume"])):
        r = run_main(script, *argv)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (script, r.stderr)
        assert f"{flipped / 'best'} is damaged (its student.pt does not match its checksum in best/manifest.json" \
               in r.stderr and "resume the search with --repair (best/ is exported again" in r.stderr
        assert {p: p.read_bytes() for p in flipped.rglob("*") if p.is_file()} == files
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args("flipped")), "--resume",
                        "--repair", "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "repaired best/: removed (its student.pt does not match" in r.stdout
    after = json.loads((flipped / "best" / "metrics.json").read_text())
    for key in ("val_acc", "test_acc", "student_test_acc", "param_ratio", "seeds"):
        assert after[key] == before[key], key
    assert run_main("results/report.py", flipped).returncode == 0

    gone = tmp_path / "gone"
    shutil.copytree(src, gone, symlinks=True)
    assert manifest["checkpoint_files"]
    shutil.rmtree((gone / manifest["checkpoint"]).parent)  # its checkpoint folder
    r = run_main("results/report.py", gone)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "is damaged (the winner's checkpoint that best/ was made from is missing)" in r.stderr
    assert "restore it from a copy of the search folder" in r.stderr


def test_a_study_journal_that_lost_its_last_records_is_found_and_repair_tells_it_again(tmp_path, ray_address):
    """A finished search whose study journal lost its last lines (trials lose their final state, none disappears), or
    was cut inside its last record: report.py and --resume refuse it in one line; --repair never drops a finished
    trial's result: each is told to the study again from the scheduler's record, as the table has it."""
    import shutil

    from conftest import run_main
    from results.checks import running_but_finished
    from results.journal import open_study
    from results.study import newest_records

    def args(name):
        return ["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 3, "--storage", tmp_path,
                "--name", name, "--no-report"]

    assert search(*args("s")) == 0
    journal = Path("akdtune") / "study.journal"
    lines = (tmp_path / "s" / journal).read_bytes().splitlines(keepends=True)
    cuts = {}
    for k in range(1, 8):  # the fewest last lines whose loss leaves a finished trial running in the study
        exp = tmp_path / f"lines-{k}"
        shutil.copytree(tmp_path / "s", exp, symlinks=True)
        (exp / journal).write_bytes(b"".join(lines[:-k]))
        if running_but_finished(exp) and {t.user_attrs.get("ray_trial_id") for t in
                                          open_study(exp / journal).get_trials()} >= set(trials_table(exp)["trial_id"]):
            cuts["lines"] = exp
            break
        shutil.rmtree(exp)
    assert "lines" in cuts, "no cut of the journal's last lines left a finished trial running"
    exp = tmp_path / "inside"
    shutil.copytree(cuts["lines"], exp, symlinks=True)
    (exp / journal).write_bytes((exp / journal).read_bytes() + lines[-len(lines) + len(
        (cuts["lines"] / journal).read_bytes().splitlines())][:10])  # and the next record, cut inside
    cuts["inside"] = exp
    for name, exp in cuts.items():
        r = run_main("results/report.py", exp)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (name, r.stderr)
        assert "study.journal is damaged" in r.stderr and "--repair" in r.stderr, (name, r.stderr)
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args(exp.name)),
                            "--resume", "--repair", "--address", ray_address], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "told the study how" in r.stdout, (name, r.stdout[-2000:])
        table = trials_table(exp)
        words = {"completed": "COMPLETE", "stopped_early": "PRUNED"}
        states = {t.user_attrs["ray_trial_id"]: t.state.name for t in newest_records(open_study(exp / journal))
                  if "ray_trial_id" in t.user_attrs}
        assert {t: states[t] for t in table["trial_id"]} == {t: words[o] for t, o in zip(table["trial_id"],
                                                                                         table["outcome"])}
        assert run_main("results/report.py", exp).returncode == 0


def test_a_resume_killed_as_it_starts_ten_times_never_trains_a_proposal_twice(tmp_path, ray_address):
    """kill -9 of a resumed search 1 s or 5 s after it says it resumes, or inside its first copy of Tune's state, ten
    times over, then a resume to the end: every proposal is trained once (one finished trial per place in the order
    of proposals), N trials, and as many settings refused over the budget as the search run without a break."""
    import threading

    from results.journal import open_study
    from results.limits import count_refused
    from search.searcher import INDEX, RAY_ID

    assert search(*REPEAT_ARGS, "--storage", tmp_path, "--name", "whole") == 0
    exp, args = tmp_path / "k", [*REPEAT_ARGS, "--storage", tmp_path, "--name", "k"]
    _killed_after_two_trials(args, ray_address, exp)
    for rep in range(10):
        proc, lines = _start([*args, "--resume"], ray_address), []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True)
        reader.start()
        try:
            assert _wait_for(lambda p=proc, out=lines: any(line.startswith("resuming") for line in out)
                             or p.poll() is not None, timeout=300, every=0.01)
            if rep % 3 == 2:
                _wait_for(lambda p=proc: _tmp_files(exp) or p.poll() is not None, timeout=60, every=0.001)
            else:
                time.sleep(1 if rep % 3 == 0 else 5)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join(timeout=10)
        assert "Traceback" not in "".join(lines), "".join(lines)[-3000:]
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                        "--address", ray_address], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if r.returncode == 2 and "--repair" in r.stderr:  # a kill cut the study journal's last record
        r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, args), "--resume",
                            "--repair", "--address", ray_address], capture_output=True, text=True, cwd=ROOT,
                           timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = trials_table(exp)
    assert len(trials) == 8 and trials["trial_id"].is_unique and list(trials["trial"]) == list(range(8))
    study = open_study(exp / "akdtune" / "study.journal")
    trained = {}
    for t in study.get_trials(deepcopy=False):
        if RAY_ID in t.user_attrs and t.state.name in ("COMPLETE", "PRUNED"):
            trained.setdefault(t.user_attrs[INDEX], []).append(t.user_attrs[RAY_ID])
    assert trained == {k: [tid] for k, tid in zip(trials["trial"], trials["trial_id"])}, trained
    assert count_refused(study) == count_refused(open_study(tmp_path / "whole" / "akdtune" / "study.journal"))
    _same_search(tmp_path / "whole", exp)
