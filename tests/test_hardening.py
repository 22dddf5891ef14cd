"""Bad input never crashes, hangs or escapes: one line saying what is wrong, exit 2, nothing written.

Each class found by the bad-input campaign has its cases here: options, paths, space files, teachers.
"""
import os
import pickle

import pytest
import torch

from conftest import ROOT, bounded, run_cli, run_main

SPACE = ROOT / "spaces" / "ratios.yaml"


def one_line_exit_2(r, needle: str):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def files_under(path):
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else []


# ------------------------------------------------------------------ options, checked before anything is written
@pytest.mark.parametrize("args, needle", [
    (["--num-cpus", "0"], "--num-cpus 0 is invalid"),
    (["--max-concurrent", "-1"], "--max-concurrent -1 is invalid"),
    (["--max-failures", "-1"], "--max-failures -1 is invalid"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial 0.0 is invalid"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial nan is invalid"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial -1.0 is invalid"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5 is invalid"),
    (["--num-samples", "0"], "--num-samples 0 is invalid"),
    (["--confirm-top-k", "-1"], "--confirm-top-k -1 is invalid"),
    (["--confirm-seeds", "0"], "--confirm-seeds 0 is invalid"),
    (["--num-cpus", "2", "--address", "auto"], "cannot be combined with --address"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_options_refused_before_anything_is_written(tmp_path, args, needle):
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path / "runs", *args)
    one_line_exit_2(r, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--gpus-per-trial", "1", "--num-cpus", "1"], "--gpus-per-trial 1 but the Ray cluster has 0 GPUs"),
    (["--cpus-per-trial", "3", "--num-cpus", "2"], "--cpus-per-trial 3 but the Ray cluster has 2 CPUs"),
])
def test_resources_this_machine_lacks_are_refused_before_ray_starts(tmp_path, args, needle):
    if torch.cuda.is_available() and "--gpus-per-trial" in args:
        pytest.skip("this machine has a GPU")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of this test session is running in this process")
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path, *args)
    one_line_exit_2(r, needle)  # no Ray notice before it: Ray was never started
    assert not ray.is_initialized()
    assert not (tmp_path / "ratios").exists()  # the corrected command is not refused as "already exists"


def test_an_address_that_does_not_answer_fails_in_bounded_time(tmp_path):
    # Bounded by construction: the address is probed with a socket timeout before Ray is asked to join it (a wall
    # time asserted here failed on a loaded machine; speed belongs in benchmarks).
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path, "--address", "127.0.0.1:9")
    one_line_exit_2(r, "nothing answers there within 10 s")
    assert "teacher" not in r.stdout and "speed" not in r.stdout  # checked before the teacher and the speed step
    assert not (tmp_path / "ratios").exists()


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "/abs"])
def test_a_name_that_leaves_the_storage_folder_is_refused(tmp_path, name):
    storage = tmp_path / "runs"
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", storage, "--name", name)
    one_line_exit_2(r, "--name")
    assert files_under(tmp_path) == []


def test_storage_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path / "file")
    one_line_exit_2(r, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_resume_on_a_read_only_storage_is_refused(tmp_path):
    exp = tmp_path / "ratios"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(pickle.dumps({}))  # stands in for Tune's
    exp.chmod(0o500)
    try:
        r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path, "--resume")
        one_line_exit_2(r, "read-only")
    finally:
        exp.chmod(0o700)


def test_run_akd_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_main("trainable/run_akd.py", "--out", tmp_path / "f")
    one_line_exit_2(r, "is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_train_teacher_out_that_is_a_folder_is_refused_before_training(tmp_path):
    with bounded(120):
        r = run_main("trainable/train_teacher.py", "--task", "digits", "--out", tmp_path)
    one_line_exit_2(r, "is a folder")
    assert files_under(tmp_path) == [] and "epoch" not in r.stdout


# ------------------------------------------------------------------ space files
BOMB = "\n".join(
    [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("content, needle", [
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + BOMB + "\nparams: *i\n", "too large once its aliases are expanded"),
    ("params: " + "[" * 500 + "]" * 500 + "\n", "nested"),
    ("params: {}\nparams: {lr_student: {type: float, low: 0.1, high: 0.2}}\n", "appears twice"),
    (b"\xff\xfeparams: {}\n", "not UTF-8"),
    ("params:\n  lr_student: {type: float, low: 0.1, high: 0.2}\n" + "# padding\n" * 40000, "too large for a space file"),
    ("params: {lr_student: " + "x" * 100000 + "}\n", "(truncated)"),
], ids=["alias bomb", "deep nesting", "duplicate key", "not utf-8", "huge file", "huge value"])
def test_hostile_space_files_exit_2_in_one_short_line(tmp_path, content, needle):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with bounded(120):  # an expanded bomb would run for hours
        r = run_main("search/run_search.py", "--space", f, "--storage", tmp_path / "runs")
    one_line_exit_2(r, needle)
    assert len(r.stderr) < 2000
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ teachers
def test_a_teacher_with_a_nan_weight_is_refused_at_load(tmp_path, digits_teacher):
    state = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    r = run_main("trainable/run_akd.py", "--teacher", tmp_path / "nan.pt", "--out", tmp_path / "run")
    one_line_exit_2(r, "non-finite weights")
    assert not (tmp_path / "run").exists()


def test_a_wrong_architecture_teacher_says_what_to_do(tmp_path):
    torch.save({"linear.weight": torch.zeros(10, 4)}, tmp_path / "other.pt")
    r = run_main("trainable/run_akd.py", "--teacher", tmp_path / "other.pt", "--out", tmp_path / "run")
    one_line_exit_2(r, "--set teacher=NAME")
    assert "--teacher-arch" not in r.stderr


def test_a_corrupt_teacher_prints_no_torch_warning(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")
    r = run_main("trainable/run_akd.py", "--teacher", tmp_path / "bad.pt", "--out", tmp_path / "run")
    one_line_exit_2(r, "cannot read teacher checkpoint")
    assert "Warning" not in r.stderr


@pytest.mark.slow
def test_the_scripts_themselves_exit_2_with_one_line(tmp_path):
    """The same refusal through a real process: the exit status and stderr a shell sees."""
    r = run_cli("search/run_search.py", "--space", SPACE, "--storage", tmp_path / "runs", "--num-samples", "0")
    one_line_exit_2(r, "--num-samples 0 is invalid")
    r = run_cli("trainable/run_akd.py", "--out", tmp_path / "run", "--set", "nope=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------ settings of a switched-off feature
@pytest.mark.parametrize("args, needle", [
    (["--set", "feature_layers=nosuchlayer"], "'nosuchlayer' is not a layer of the teacher cnn"),
    (["--prior", "folder:{empty}"], "holds no readable images"),
    (["--prior", "folder:{missing}"], "is not a folder"),
])
def test_settings_of_a_feature_that_is_off_are_still_checked(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in args]
    r = run_main("trainable/run_akd.py", "--out", tmp_path / "run", *args)  # dfad: no alignment, no prior read
    one_line_exit_2(r, needle)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ settings that cannot make a run, refused before Ray
@pytest.mark.parametrize("fixed, needle", [
    ({"method": "avkd", "prior": "folder:{empty}"}, "holds no readable images"),
    ({"w_feature": 1.0, "feature_projection": False, "student_fraction": 0.05}, "feature"),
])
def test_a_space_whose_fixed_settings_cannot_make_a_run_is_refused_before_ray(tmp_path, fixed, needle):
    import yaml

    (tmp_path / "empty").mkdir()
    fixed = {k: (v.format(empty=tmp_path / "empty") if isinstance(v, str) else v) for k, v in fixed.items()}
    space = {"budget": {"num_samples": 2, "max_epochs": 3, "grace_period": 1}, "fixed": fixed,
             "params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(space))
    r = run_main("search/run_search.py", "--space", tmp_path / "bad.yaml", "--smoke", "--storage", tmp_path / "runs",
                 "--no-report")
    one_line_exit_2(r, needle)
    assert files_under(tmp_path / "runs") == []  # no tuner.pkl: the corrected command is not refused as existing


# ------------------------------------------------------------------ targets that cannot be written, hostile factories
def test_a_search_folder_on_a_read_only_filesystem_is_one_line_for_the_report(tmp_path, monkeypatch):
    import errno

    import results.report as report

    def read_only(run_dir, copy_to=None):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "s" / "summary" / "trials.parquet"))

    monkeypatch.setattr(report, "report_of", read_only)
    r = run_main("results/report.py", tmp_path / "s")
    one_line_exit_2(r, f"cannot write {tmp_path / 's' / 'summary' / 'trials.parquet'} (Read-only file system); ")
    assert "copy a read-only search somewhere writable (cp -a)" in r.stderr


def test_an_out_that_cannot_be_made_and_bad_threads_are_one_line_before_any_work(tmp_path):
    one_line_exit_2(run_main("trainable/run_akd.py", "--out", "/proc/x"), "cannot write /proc/x (")
    one_line_exit_2(run_main("trainable/run_akd.py", "--out", tmp_path / ("b" * 300)), "(File name too long)")
    one_line_exit_2(run_main("trainable/run_akd.py", "--threads", "-5", "--out", tmp_path / "o"),
                    "--threads -5 is invalid: must be >= 1")
    r = run_main("search/run_search.py", "--space", SPACE, "--storage", tmp_path, "--name", "n" * 300)
    one_line_exit_2(r, "--name is 300 bytes long: a folder name may have at most 200")
    assert list(tmp_path.iterdir()) == []


def test_a_factory_that_calls_sys_exit_is_its_failure_in_one_line(tmp_path, monkeypatch):
    """sys.exit(0) inside a user's factory once ended run_akd.py with exit 0 and nothing printed."""
    (tmp_path / "exits_here.py").write_text("import sys\n\n\ndef Net(num_classes=10):\n    sys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    r = run_main("trainable/run_akd.py", "--set", "student=exits_here:Net", "--out", tmp_path / "o")
    one_line_exit_2(r, "building exits_here:Net with num_classes=10 raised SystemExit: 0")
