"""How files are written: atomically, by this project and by Ray Tune into a local search folder; a killed writer's
leftovers removed by the next one."""
import os
import pickle
import subprocess
import sys

import pyarrow.fs
import pytest

from base.atomicfs import atomic_local_filesystem, holding_filesystem
from base.files import remove_strays, write_json, write_text
from conftest import ROOT

# A writer killed (kill -9) halfway through a file: Tune's copy of its state through our filesystem.
KILLED_MID_COPY = """
import os, sys
from base.atomicfs import atomic_local_filesystem
out = atomic_local_filesystem().open_output_stream(sys.argv[1])
out.write(b'{"half": ')
out.flush()
os.kill(os.getpid(), 9)
"""


def test_a_kill_in_the_middle_of_tunes_copy_leaves_the_old_file_and_the_next_writer_removes_its_leftover(tmp_path):
    target = tmp_path / "experiment_state-2026.json"
    target.write_text('{"whole": true}')
    r = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, str(target)], cwd=ROOT, capture_output=True)
    assert r.returncode == -9
    assert target.read_text() == '{"whole": true}'  # not cut, not 0 bytes
    strays = [p for p in tmp_path.iterdir() if p != target]
    assert len(strays) == 1 and strays[0].name.startswith(".experiment_state-2026.")  # the killed writer's
    with atomic_local_filesystem().open_output_stream(str(target)) as out:
        out.write(b'{"new": true}')
    assert target.read_text() == '{"new": true}' and sorted(tmp_path.iterdir()) == [target]


def test_tunes_copies_through_the_atomic_filesystem_are_whole_and_it_travels_to_workers(tmp_path):
    src = tmp_path / "staging"
    (src / "trial_a" / "checkpoint_000000").mkdir(parents=True)
    (src / "trial_a" / "params.json").write_text('{"lr": 0.1}')
    (src / "trial_a" / "checkpoint_000000" / "checkpoint.pt").write_bytes(os.urandom(3 << 20))
    fs = pickle.loads(pickle.dumps(atomic_local_filesystem()))  # as a worker gets it with the storage settings
    pyarrow.fs.copy_files(str(src), str(tmp_path / "search"), destination_filesystem=fs, chunk_size=1 << 20)
    for f in src.rglob("*"):
        if f.is_file():
            assert (tmp_path / "search" / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert not [p for p in (tmp_path / "search").rglob(".*")]  # no temporary file left behind
    info = fs.get_file_info(str(tmp_path / "search" / "trial_a" / "params.json"))
    assert info.size == len('{"lr": 0.1}')


def test_a_write_that_fails_or_is_abandoned_leaves_the_old_file(tmp_path, monkeypatch):
    import builtins

    from base import atomicfs
    from base.files import atomic_path

    target = tmp_path / "state.json"
    target.write_text("old")
    # A full disk: the write raises ENOSPC (as /dev/full does), and the stream is closed on the way out.
    monkeypatch.setattr(atomicfs, "open", lambda path, mode: builtins.open("/dev/full", "wb", buffering=0),
                        raising=False)
    with pytest.raises(OSError, match="No space left"):
        with atomic_local_filesystem().open_output_stream(str(target)) as out:
            out.write(b"new contents")
    monkeypatch.undo()
    assert target.read_text() == "old"
    # A copy abandoned part way (its stream never closed, only dropped): nothing replaces the file.
    out = atomic_local_filesystem().open_output_stream(str(target))
    out.write(b"ne")
    del out
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:  # this project's own writer, failing half way
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_stray_temporary_files_of_dead_writers_are_removed_and_a_live_writers_are_kept(tmp_path):
    target = tmp_path / "report.html"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".report.{dead_pid}.tmp.html").write_text("half a report")  # a killed results/report.py
    (tmp_path / f".report.{os.getppid()}.tmp.html").write_text("being written")  # a live writer's
    (tmp_path / ".reportx.1.tmp.html").write_text("another file's")
    write_text(target, "<html>")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".report.{os.getppid()}.tmp.html", ".reportx.1.tmp.html", "report.html"]
    assert remove_strays(target) == []
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n "x": 1\n}\n'


def test_a_search_moved_twice_writes_only_where_it_is_now():
    """Tune's tuner.pkl holds the paths of the folder a search was started in, its callback state those of its last
    session's folder: after copies or moves, both are re-pointed to the folder being resumed, nothing else."""
    from results.moves import folders_of, here, relocate

    record = {"folder": "/b/s", "folders": ["/a/s", "/b/s"]}  # started in /a/s, resumed once in /b/s
    assert folders_of(record) == ["/a/s", "/b/s"] and folders_of({"folder": "/x/s"}) == ["/x/s"]
    relocate(folders_of(record), "/c/s")
    try:
        assert here("/a/s/akdtune/study.journal") == "/c/s/akdtune/study.journal"
        assert here("/b/s/trial_1/checkpoint_000000") == "/c/s/trial_1/checkpoint_000000"
        assert here("/a/s") == "/c/s" and here("/a/sx/file") == "/a/sx/file" and here("/elsewhere") == "/elsewhere"
        relocate(folders_of(record), "/b/s")  # resumed where it was last: only the first folder moves
        assert here("/a/s/x") == "/b/s/x" and here("/b/s/x") == "/b/s/x"
    finally:
        relocate(None, "/")


def _storage_filesystem(kind: str):
    """The filesystem Tune is given for local storage, or (standing in for a URI's: what ``HoldingFS`` wraps is any
    ``pyarrow.fs`` filesystem, S3's in the search) a plain pyarrow filesystem wrapped as for a URI."""
    return atomic_local_filesystem() if kind == "local" else holding_filesystem(pyarrow.fs.LocalFileSystem())


@pytest.mark.parametrize("kind", ["local", "uri"])
def test_tunes_deletion_of_an_older_checkpoint_waits_for_two_uploads_of_the_experiment_state(tmp_path, monkeypatch,
                                                                                             kind):
    """Tune deletes a trial's older checkpoint as it registers a newer one, before its experiment state (which a
    resume reads) names the newer one: the deletion is held until two uploads of the state begun after it have
    ended, and what is still held when the experiment ends is deleted then; on local storage and on a URI's."""
    from base import atomicfs

    monkeypatch.setattr(atomicfs, "HELD", atomicfs.HeldDeletions())
    fs = _storage_filesystem(kind)
    old, other, plain = tmp_path / "trial_1" / "checkpoint_000000", tmp_path / "trial_2" / "checkpoint_000003", tmp_path / "x"
    for d in (old, other, plain):
        d.mkdir(parents=True)
        (d / "checkpoint.pt").write_bytes(b"x")
    state = str(tmp_path / "experiment_state-2026.json")

    def upload():
        with fs.open_output_stream(state) as out:
            out.write(b"{}")

    begun = fs.open_output_stream(state)  # an upload already under way when the deletion is asked for
    fs.delete_dir(str(old))
    fs.delete_dir(str(plain))  # not a checkpoint: deleted at once
    assert old.is_dir() and not plain.exists()
    begun.write(b"{}")
    begun.close()
    with fs.open_output_stream(str(tmp_path / "trial_1" / "result.json")) as out:  # not the experiment state
        out.write(b"{}")
    upload()
    assert old.is_dir()  # one upload since: it may hold a state written before the deletion was asked for
    upload()
    assert not old.exists()
    fs.delete_dir(str(other))
    assert atomicfs.HELD.release() == [str(other)] and not other.exists()


def test_a_uris_filesystem_with_held_deletions_reaches_the_workers_as_the_same_filesystem(tmp_path):
    """Tune pickles its storage filesystem into every trial; the wrapped one arrives equal, and writes and reads
    through the filesystem it wraps."""
    fs = holding_filesystem(pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()))
    back = pickle.loads(pickle.dumps(fs))
    assert back.equals(fs) and back.type_name == fs.type_name
    back.create_dir("trial_1")
    with back.open_output_stream("trial_1/result.json") as out:
        out.write(b"{}")
    assert (tmp_path / "trial_1" / "result.json").read_bytes() == b"{}"
    assert fs.get_file_info("trial_1/result.json").type == pyarrow.fs.FileType.File


@pytest.mark.parametrize("kind", ["local", "uri"])
def test_the_checkpoint_tunes_saved_state_names_is_never_deleted(tmp_path, ray_address, kind):
    """A real Tune run on the search's storage settings (its filesystem, num_to_keep=2): each time Tune registers a
    checkpoint (and deletes an older one), every checkpoint its saved experiment state names (the one a resume
    restores each trial from) still exists. Without the held deletions Tune deletes, at a trial's fourth checkpoint,
    the second, which the state it last saved (forced at the second) names. ``uri``: the storage is a path inside
    a filesystem Tune is handed, as a search on ``s3://`` is run; there this run's uploads of the state came soon
    enough after each deletion that it also passed with the hold turned off, so what it shows is that Tune runs
    and deletes through the wrapped filesystem (the hold itself: the unit test above)."""
    import json
    import tempfile
    from pathlib import Path

    from ray import tune

    from base import atomicfs

    def counting(config):
        for i in range(6):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "n").write_text(str(i))
                tune.report({"i": i}, checkpoint=tune.Checkpoint.from_directory(d))

    exp = tmp_path / "exp"

    class NamedCheckpointsExist(tune.Callback):
        checked, missing = 0, []

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            for f in exp.glob("experiment_state-*.json"):
                try:
                    state = json.loads(f.read_text())
                except ValueError:  # being written: the uri case's stand-in writes in place (an object store does not)
                    continue
                for t, m in state["trial_data"]:
                    name = (json.loads(m).get("last_result") or {}).get("checkpoint_dir_name")
                    if name and json.loads(t)["status"] == "RUNNING":
                        NamedCheckpointsExist.checked += 1
                        d = exp / f"trial_{json.loads(t)['trial_id']}" / name
                        if not d.is_dir():
                            NamedCheckpointsExist.missing.append(str(d))

    tuner = tune.Tuner(counting, param_space={"x": tune.grid_search([1, 2])},
                       tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                       run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                                 storage_filesystem=_storage_filesystem(kind),
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                                 callbacks=[NamedCheckpointsExist()]))
    from search.tuner import fit

    fit(tuner)
    assert NamedCheckpointsExist.checked > 0 and NamedCheckpointsExist.missing == []
    for d in exp.glob("trial_*"):  # what was held is deleted at the end: Tune's two newest are left
        assert sorted(c.name for c in d.glob("checkpoint_*")) == ["checkpoint_000004", "checkpoint_000005"]
    assert atomicfs.HELD.held == []


def test_a_resume_sweeps_the_temporary_files_of_dead_writers_left_in_abandoned_trial_folders(tmp_path):
    import subprocess
    import sys

    from base.files import sweep_strays

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    trial = tmp_path / "trial_abc" / "checkpoint_000001"
    trial.mkdir(parents=True)
    stray = [trial / f".checkpoint.{dead}.tmp.pt", tmp_path / "trial_abc" / f".result.{dead}.tmp.json"]
    live = trial / f".checkpoint.{os.getpid()}.tmp.pt"  # a writer that is running: left alone
    kept = [trial / "checkpoint.pt", tmp_path / "trial_abc" / "result.json"]
    for p in [*stray, live, *kept]:
        p.write_bytes(b"x")
    assert sorted(sweep_strays(tmp_path)) == sorted(stray)
    assert all(p.exists() for p in [live, *kept]) and not any(p.exists() for p in stray)


def test_a_saved_tensor_file_is_the_same_bytes_whichever_process_writes_it(tmp_path):
    """The archive inside a file torch_save writes is not named after the writer's temporary file (its pid): two
    processes saving the same state write the same bytes (best/student.pt and .pt2 of one search do not differ)."""
    code = ("import sys, torch; from base.files import torch_save; torch.manual_seed(0); "
            "torch_save(torch.nn.Linear(3, 2).state_dict(), sys.argv[1])")
    for name in ("a.pt", "b.pt"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
