"""A search on cloud storage (``--storage s3://...``): the whole search lives at the URI (the tool's records, the study,
the confirmation, ``best/``, the summaries, the report), a kill -9 of the driver is resumed from the URI alone on a
fresh working copy, and ``results/report.py`` reads the URI. The object store is moto's standalone S3 server on
127.0.0.1, started here; the working copy's mechanics are tested on a local ``file://`` URI, without a server."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from base import storage
from base.errors import UserError
from base.layout import is_own
from conftest import ROOT, run_main

BUCKET = "akdtune-tests"


# ---------------------------------------------------------------------------------------------------------------
# The storage layer itself (fast): URIs, the working copy, what is uploaded and downloaded
# ---------------------------------------------------------------------------------------------------------------
def test_a_uri_keeps_its_query_when_a_name_is_added_and_a_local_path_stays_a_path(tmp_path):
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "lr") == "s3://bucket/runs/lr?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("s3://bucket/runs/", "lr", "best") == "s3://bucket/runs/lr/best"
    assert storage.join(str(tmp_path), "lr") == str(tmp_path / "lr")
    assert storage.is_uri(uri) and not storage.is_uri(str(tmp_path)) and not storage.is_uri(None)
    a, b = storage.work_folder(uri, "lr", str(tmp_path)), storage.work_folder(storage.join(uri, "x"), "lr", str(tmp_path))
    assert a.parent == tmp_path and a.name.startswith("lr-") and a != b  # one working copy per search URI


def test_the_working_copy_uploads_only_the_tools_files_each_once_and_a_fresh_copy_is_made_from_the_uri(tmp_path):
    remote = tmp_path / "bucket" / "s"
    for rel, data in {"akdtune/search.json": b"{}", "tuner.pkl": b"t", "trial_a/result.json": b"r",
                      "trial_a/checkpoint_000000/checkpoint.pt": b"0", "trial_a/checkpoint_000001/checkpoint.pt": b"1",
                      "trial_b/checkpoint_000003/checkpoint.pt": b"3"}.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_bytes(data)
    m = storage.Mirror(remote.as_uri(), tmp_path / "work", is_own)
    m.reset()
    m.pull()  # no checkpoints
    got = {p.relative_to(m.work).as_posix() for p in m.work.rglob("*") if p.is_file()}
    assert got == {"akdtune/search.json", "tuner.pkl", "trial_a/result.json"}
    assert m.push_changed() == 0  # what was downloaded is not sent back
    m.latest_checkpoint_of("trial_a")  # the newest only, where one is read
    assert (m.work / "trial_a/checkpoint_000001/checkpoint.pt").read_bytes() == b"1"
    assert not (m.work / "trial_a/checkpoint_000000").exists()
    (m.work / "akdtune/search.json").write_bytes(b'{"a": 1}')
    (m.work / "tuner.pkl").write_bytes(b"changed here")  # Tune's file: never uploaded from the copy
    (m.work / "best").mkdir()
    (m.work / "best/metrics.json").write_bytes(b"m")
    (m.work / "akdtune/best.partial").mkdir()
    (m.work / "akdtune/best.partial/student.pt").write_bytes(b"half")  # being written: not yet
    assert m.push_changed() == 2 and m.push_changed() == 0
    assert (remote / "akdtune/search.json").read_bytes() == b'{"a": 1}' and (remote / "best/metrics.json").exists()
    assert (remote / "tuner.pkl").read_bytes() == b"t" and not (remote / "akdtune/best.partial").exists()
    fresh = storage.Mirror(remote.as_uri(), tmp_path / "work", is_own)
    fresh.reset()  # a new session: nothing local is kept
    assert not any(fresh.work.iterdir())
    fresh.pull()
    assert (fresh.work / "akdtune/search.json").read_bytes() == b'{"a": 1}'
    assert (fresh.work / "tuner.pkl").read_bytes() == b"t"


def test_a_record_written_into_an_attached_working_copy_is_uploaded_at_once(tmp_path):
    from results.recordfile import read_record, write_record

    remote = tmp_path / "bucket" / "s"
    remote.mkdir(parents=True)
    m = storage.attach(storage.Mirror(remote.as_uri(), tmp_path / "work", is_own))
    try:
        m.reset()
        write_record(m.work / "akdtune/other.json", {"x": 1})
        assert read_record(remote / "akdtune/other.json") == {"x": 1}
        storage.written(tmp_path / "elsewhere.json")  # not in a working copy: nothing happens
    finally:
        storage.detach(m)
    write_record(m.work / "akdtune/other.json", {"x": 2})  # detached: local only
    assert read_record(remote / "akdtune/other.json") == {"x": 1}


def test_a_worker_reads_a_file_of_a_search_on_a_uri_from_a_temporary_download(tmp_path):
    (tmp_path / "s" / "trial_a").mkdir(parents=True)
    (tmp_path / "s" / "trial_a" / "c.pt").write_bytes(b"ckpt")
    path, done = storage.local_file((tmp_path / "s").as_uri(), "trial_a/c.pt")
    assert path.read_bytes() == b"ckpt" and tmp_path not in path.parents
    done()
    assert not path.exists()
    local, _ = storage.local_file(str(tmp_path / "s"), "trial_a/c.pt")
    assert local == tmp_path / "s" / "trial_a" / "c.pt"


# ---------------------------------------------------------------------------------------------------------------
# A real S3 endpoint (slow): moto's server
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_storage(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with an empty bucket; the ``--storage`` URI of a folder in it."""
    pytest.importorskip("moto.server", reason="moto[server] is the test S3 endpoint (pip install 'moto[server]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
                                 "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < end and proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.2)
        uri = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield uri
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _downloaded(uri: str, to: Path) -> Path:
    """Every file of the search at ``uri`` but the checkpoints, in the local folder ``to``."""
    m = storage.Mirror(uri, to, is_own)
    m.reset()
    m.pull()
    return to


@pytest.mark.slow
def test_a_bucket_that_does_not_exist_and_an_endpoint_that_does_not_answer_are_refused_in_one_line(s3_storage):
    missing = s3_storage.replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    dead = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    for uri, said in ((missing, "has no bucket 'no-such-bucket'; create it"), (dead, "cannot read s3://")):
        r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--storage", uri)
        assert r.returncode == 2 and said in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_main("results/report.py", storage.join(s3_storage, "nothing-here"))
    assert r.returncode == 2 and "no search at s3://" in r.stderr


@pytest.mark.slow
def test_a_search_on_s3_holds_everything_in_the_bucket_and_a_killed_one_resumes_from_the_uri_alone(
        tmp_path, ray_address, s3_storage):
    """The uninterrupted search ends as a local one does (the winner printed; best/ with student.pt2, the records,
    summaries and report in the bucket). The same command killed (kill -9) once two trials finished, then resumed
    from the URI with a new working folder: exactly N trials and the same table and winner."""
    import pandas as pd
    from test_search import REPEAT_ARGS, _same_search, _wait_for

    from results.schedule_record import scheduler_record

    def cmd(name, work, *more):
        return [sys.executable, str(ROOT / "search" / "run_search.py"), *map(str, REPEAT_ARGS), "--storage",
                s3_storage, "--name", name, "--work-dir", str(work), "--address", ray_address, *more]

    whole = subprocess.run(cmd("whole", tmp_path / "w0"), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert "best trial" in whole.stdout and f"best student: s3://{BUCKET}/runs/whole/best" in whole.stdout
    names = {rel for rel, _ in storage.Mirror(storage.join(s3_storage, "whole"), tmp_path / "x", is_own).files()}
    for rel in ("akdtune/search.json", "akdtune/study.journal", "akdtune/scheduler.json", "akdtune/confirm.json",
                "akdtune/confirmed.json", "best/student.pt2", "best/metrics.json", "best/trial.json",
                "summary/trials.parquet", "summary/epochs.parquet"):
        assert rel in names, rel

    # Killed once two trials finished: the working copy's scheduler record says when (its uploads follow at once).
    w1 = tmp_path / "w1"
    proc = subprocess.Popen(cmd("k", w1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def finished():
        copies = list(w1.glob("k-*/akdtune/scheduler.json"))
        try:
            state = scheduler_record(copies[0]) if copies else {}
        except (OSError, ValueError, UserError):
            return 0
        return len(state.get("stopped", [])) + len(state.get("finished", []))

    try:
        assert _wait_for(lambda: finished() >= 2 or proc.poll() is not None, timeout=400), "no trial in time"
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(6)  # Tune uploads its experiment state every few seconds
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    uri = storage.join(s3_storage, "k")
    assert storage.exists(uri, "tuner.pkl") and storage.exists(uri, "akdtune/search.json")
    assert not storage.exists(uri, "best/trial.json")

    resumed = subprocess.run(cmd("k", tmp_path / "w2", "--resume"), capture_output=True, text=True, cwd=ROOT,
                             timeout=900)  # a new working folder: nothing local from the first driver
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and "resuming" in resumed.stdout
    a, b = _downloaded(storage.join(s3_storage, "whole"), tmp_path / "a"), _downloaded(uri, tmp_path / "b")
    table = pd.read_parquet(b / "summary" / "trials.parquet")
    assert len(table) == 8 and table["trial_id"].is_unique
    _same_search(a, b)

    r = run_main("results/report.py", uri, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "report" / "summary" / "trials.parquet").is_file()
    assert storage.exists(uri, "report.html")  # the search ran with --no-report: report.py wrote it into the bucket
