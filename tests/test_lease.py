"""One driver per search (``search.lease``): the lease on a local folder (flock) and on a URI (claim objects, listed,
with a heartbeat), a holder named in the refusal, a gone holder taken over, and a holder that finds its lease taken
stopping. The URI lease runs here on ``file://`` URIs (pyarrow's local filesystem: the same calls as S3's); the
slow lane runs it on a real S3 endpoint (tests/test_storage.py)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from base.errors import UserError
from base.layout import LEASE_DIR, LOCK_FILE
from conftest import ROOT, run_main
from search import lease as L


def test_a_local_search_has_one_driver_and_the_refusal_names_the_holder(tmp_path):
    first = L.take(str(tmp_path / "runs" / "s"), "s", "python search/run_search.py ...")
    with pytest.raises(UserError) as e:
        L.take(str(tmp_path / "runs" / "s"), "s", "the second")
    line = str(e.value)
    assert "\n" not in line and f"search 's' is in use by another driver: pid {os.getpid()} on " \
                                f"{socket.gethostname()}" in line
    first.release(started=False)
    assert not (tmp_path / "runs").exists()  # a search that never started leaves no folder behind
    L.take(str(tmp_path / "runs" / "s"), "s", "after").release(started=True)
    assert (tmp_path / "runs" / "s" / "akdtune").is_dir() and not (tmp_path / "runs" / "s" / LOCK_FILE).exists()


def test_a_local_lease_is_let_go_when_its_holder_is_killed_and_take_over_does_not_take_a_live_one(tmp_path):
    folder = tmp_path / "s"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from search.lease import take; "
            "take(sys.argv[1], 's', 'x'); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid} on .*kill {holder.pid}"):
            L.take(str(folder), "s", "me", take_over=True)
    finally:
        holder.kill()
        holder.wait()
    L.take(str(folder), "s", "me").release(started=True)  # the kernel let go of a killed holder's lock at once


@pytest.fixture
def quick(monkeypatch):
    """Lease times of a test: heartbeats every 0.2 s, stale after 3 s; a lost holder records instead of dying."""
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(L, "STALE_S", 3.0)
    lost = []
    monkeypatch.setattr(L.UriLease, "_lost", lambda self, why: (lost.append(why), self.stop.set()))
    return lost


def _uri(tmp_path):
    return f"file://{tmp_path}/bucket/runs/s"


def _objects(tmp_path):
    d = tmp_path / "bucket" / "runs" / "s" / LEASE_DIR
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _plant(tmp_path, host="elsewhere", pid=12345, age_s=0.0, gen=1):
    """A held lease of another driver, written as that driver writes it, ``age_s`` seconds old."""
    d = tmp_path / "bucket" / "runs" / "s" / LEASE_DIR
    d.mkdir(parents=True, exist_ok=True)
    data = {"token": "t" * 32, "host": host, "boot": "", "pid": pid, "pid_started": "", "user": "ana",
            "since": "2026-12-07 10:00:00 UTC", "command": "python search/run_search.py", "state": "held", "gen": gen,
            "beat": 3}
    path = d / f"{'t' * 32}.json"
    path.write_text(json.dumps(data))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_search_on_a_uri_has_one_driver_whose_heartbeat_renews_its_lease(tmp_path, quick):
    (tmp_path / "bucket").mkdir()
    first = L.take(_uri(tmp_path), "s", "a")
    mine = tmp_path / "bucket" / "runs" / "s" / LEASE_DIR / f"{first.holder.token}.json"
    beat = json.loads(mine.read_text())["beat"]
    with pytest.raises(UserError) as e:
        L.take(_uri(tmp_path), "s", "b")
    assert "\n" not in str(e.value) and f"pid {os.getpid()} on {socket.gethostname()}" in str(e.value)
    assert "taken over after 3 s without a heartbeat, or now with --take-over" in str(e.value)
    assert _objects(tmp_path) == [mine.name]  # the refused claim is gone
    time.sleep(1.0)
    assert json.loads(mine.read_text())["beat"] > beat and not quick
    first.release(started=True)
    assert _objects(tmp_path) == []
    L.take(_uri(tmp_path), "s", "c").release(started=True)


def test_a_uri_lease_whose_holder_is_gone_is_taken_over(tmp_path, quick):
    (tmp_path / "bucket").mkdir()
    old = _plant(tmp_path, age_s=60)  # another machine's driver, silent for longer than STALE_S
    L.take(_uri(tmp_path), "s", "me").release(started=True)
    assert not old.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(tmp_path, host=socket.gethostname(), pid=int(dead.stdout))  # this machine's, its process ended: at once
    L.take(_uri(tmp_path), "s", "me").release(started=True)
    _plant(tmp_path, age_s=0)  # heard of just now: refused, or taken with --take-over
    with pytest.raises(UserError, match="pid 12345 on elsewhere"):
        L.take(_uri(tmp_path), "s", "me")
    t0 = time.monotonic()
    L.take(_uri(tmp_path), "s", "me", take_over=True).release(started=True)
    assert time.monotonic() - t0 >= L.HEARTBEAT_S + 5 - 0.5  # it waited for the holder to notice and stop


def test_a_holder_that_finds_its_lease_taken_over_stops(tmp_path, quick):
    (tmp_path / "bucket").mkdir()
    first = L.take(_uri(tmp_path), "s", "a")
    second = L.take(_uri(tmp_path), "s", "b", take_over=True)  # waits HEARTBEAT_S + 5 for the first to notice
    assert quick and quick[0].startswith(f"it was taken over by pid {os.getpid()}")
    assert second.gen > first.gen
    time.sleep(1.0)
    assert _objects(tmp_path) == [f"{second.holder.token}.json"]  # the first's object is gone, the second holds on
    second.release(started=True)
    first.release(started=True)


def test_drivers_claiming_at_the_same_moment_never_both_hold(tmp_path, quick):
    (tmp_path / "bucket").mkdir()
    def claim(name, barrier, won, errors):
        barrier.wait()
        try:
            won.append(L.take(_uri(tmp_path), "s", name))
        except UserError as e:
            errors.append(str(e))

    for _ in range(5):
        won, errors, barrier = [], [], threading.Barrier(3)
        threads = [threading.Thread(target=claim, args=(n, barrier, won, errors)) for n in "abc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) <= 1 and len(won) + len(errors) == 3, errors
        for lease in won:
            lease.release(started=True)


def test_a_store_that_does_not_answer_is_one_line_within_the_time_limit():
    t0 = time.monotonic()
    with pytest.raises(UserError, match="the storage s3://b/x did not answer within 1 s; check the endpoint"):
        L.storage.bounded(time.sleep, 1.0, "s3://b/x", 30)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ZeroDivisionError):
        L.storage.bounded(lambda: 1 / 0, 5.0, "s3://b/x")


def test_a_node_sees_the_search_folder_as_the_driver_does_or_says_what_it_sees(tmp_path):
    lease = L.take(str(tmp_path / "s"), "s", "a")
    assert lease.proof() == (LOCK_FILE, lease.holder.token)
    assert L.check_proof(str(tmp_path / "s"), *lease.proof()) is None
    assert L.check_proof(str(tmp_path / "elsewhere"), *lease.proof()).startswith("it does not see ")
    other = tmp_path / "other" / LOCK_FILE
    other.parent.mkdir(parents=True)
    other.write_text("another driver's")
    assert L.check_proof(str(tmp_path / "other"), *lease.proof()).startswith("it sees another ")
    lease.release(started=True)


def test_a_second_driver_is_refused_by_the_command_before_it_reads_anything(tmp_path):
    lease = L.take(str(tmp_path / "runs" / "capacity"), "capacity", "the first")
    try:
        r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--storage",
                     tmp_path / "runs", "--resume")
    finally:
        lease.release(started=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: search 'capacity' is in use by another driver: pid ")


def test_ray_client_addresses_are_refused_and_the_resume_command_works_from_the_users_folder(tmp_path, monkeypatch):
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--address", "ray://h:10001")
    assert r.returncode == 2 and "Ray Client (ray://) is not supported" in r.stderr and r.stderr.count("\n") == 1
    from search.plan import resume_command

    monkeypatch.chdir(ROOT)
    assert resume_command(["--space", "s.yaml"]) == "python search/run_search.py --space s.yaml --resume"
    monkeypatch.chdir(tmp_path)
    assert resume_command(["--space", "s.yaml"]) == \
        f"python {ROOT / 'search' / 'run_search.py'} --space s.yaml --resume"


def test_a_bad_credentials_file_for_gcs_is_one_line(tmp_path, monkeypatch):
    """pyarrow raises its own ArrowException, not an OSError, for some stores' errors: one line all the same."""
    creds = tmp_path / "creds.json"
    creds.write_text('{"type": "service_account"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
    monkeypatch.setattr(L, "FIRST_CALL_S", 60.0)
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "lr.yaml", "--storage", "gs://no-bucket/runs")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "gs://no-bucket/runs/lr" in r.stderr


def test_a_file_uri_to_an_existing_folder_is_storage_like_any_other(tmp_path):
    """``--storage file:///existing/dir`` was refused as "has no bucket 'tmp'" (its first folder read as relative)."""
    L.storage.check_bucket(f"file://{tmp_path}/runs")
    with pytest.raises(UserError, match="has no bucket '/no-such-root-folder'"):
        L.storage.check_bucket("file:///no-such-root-folder/runs")
