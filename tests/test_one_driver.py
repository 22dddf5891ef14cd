"""One search, one driver, wherever it runs (slow): a second driver on a running search (a ``--resume``, or a new
search under the same name) is refused in one line naming the holder, on a local folder and on S3, and the first
ends with exactly N trials; a killed driver's search is resumed at once; storage that can be read but not written
is one line with nothing written; a running ``ray start`` cluster is not joined without ``--address``; a retried
trial runs to its own end whatever Tune had cached for it before the kill."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cluster import RAY, _kill, _node_processes, two_nodes  # noqa: F401 - the fixture
from test_search import REPEAT_ARGS, _wait_for, trials_table
from test_storage import BUCKET, _downloaded, _free_port, s3_storage  # noqa: F401 - the fixture

from conftest import ROOT

pytestmark = pytest.mark.slow
SCRIPT = str(ROOT / "search" / "run_search.py")


def _popen(args, **kw):
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def _run(args, env=None, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _second_drivers_are_refused(first_args, started, holder_pid):
    """While the first driver runs: the same command with --resume, and the same new search, each refused."""
    for more in (["--resume"], []):
        r = _run([*first_args, *more], timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith(f"error: search 'dup' is in use by another driver: pid {holder_pid} on "), r.stderr
    assert started()  # the first had started before, so the refusals came while it ran


def test_a_second_driver_on_a_running_local_search_is_refused_and_the_first_ends_whole(tmp_path, ray_address):
    args = [*REPEAT_ARGS, "--storage", tmp_path, "--name", "dup", "--address", ray_address]
    exp = tmp_path / "dup"
    first = _popen(args)
    try:
        assert _wait_for(lambda: (exp / "tuner.pkl").exists() or first.poll() is not None, timeout=300)
        assert first.poll() is None, first.communicate()[0][-3000:]
        _second_drivers_are_refused(args, lambda: first.poll() is None, first.pid)
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    table = trials_table(exp)
    assert len(table) == 8 and table["trial_id"].is_unique and len(list(exp.glob("trial_*"))) == 8
    assert not (exp / "akdtune" / "driver.lock").exists()
    assert _run(["--space", ROOT / "spaces" / "capacity.yaml", "--storage", tmp_path, "--name", "dup",
                 "--resume"]).stdout.startswith("search 'dup' is finished")


def test_a_killed_drivers_local_search_is_resumed_at_once(tmp_path, ray_address):
    args = [*REPEAT_ARGS, "--storage", tmp_path, "--name", "dup", "--address", ray_address]
    first = _popen(args)
    try:
        assert _wait_for(lambda: (tmp_path / "dup" / "tuner.pkl").exists() or first.poll() is not None, timeout=300)
        time.sleep(2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    r = _run([*args, "--resume"])  # no wait: the kernel let go of the killed driver's lock
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(trials_table(tmp_path / "dup")) == 8


def test_a_second_driver_on_a_running_search_on_s3_is_refused_and_the_first_ends_whole(tmp_path, ray_address,
                                                                                      s3_storage):  # noqa: F811
    from base import storage

    uri = storage.join(s3_storage, "dup")

    def cmd(work):
        return [*REPEAT_ARGS, "--storage", s3_storage, "--name", "dup", "--work-dir", work, "--address", ray_address]

    first = _popen(cmd(tmp_path / "w1"))
    try:
        assert _wait_for(lambda: storage.exists(uri, "tuner.pkl") or first.poll() is not None, timeout=300)
        assert first.poll() is None, first.communicate()[0][-3000:]
        # a second machine (its own working folder) and this one (the same working folder): both refused
        _second_drivers_are_refused(cmd(tmp_path / "w2"), lambda: first.poll() is None, first.pid)
        _second_drivers_are_refused(cmd(tmp_path / "w1"), lambda: first.poll() is None, first.pid)
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    here = _downloaded(uri, tmp_path / "copy")
    table = trials_table(here)
    assert len(table) == 8 and table["trial_id"].is_unique
    assert len({p.parent.name for p in here.glob("trial_*/result.json")}) == 8
    assert not storage.exists(uri, "akdtune/lease") or not list((here / "akdtune" / "lease").glob("*.json"))


@pytest.fixture
def read_only_s3(tmp_path):
    """A moto S3 server that checks credentials, with a bucket and the keys of a user who may only read it."""
    import boto3

    port = _free_port()
    # the first four calls (the bucket, the user, its policy, its keys) are made before credentials are checked
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
                             "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _answers(port), timeout=60, every=0.2)
        kw = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield (f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http",
               {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
    finally:
        proc.kill()
        proc.wait()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_storage_that_can_be_read_but_not_written_is_one_line_and_nothing_is_written(read_only_s3):
    import pyarrow.fs as pafs

    uri, keys = read_only_s3
    r = _run(["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--storage", uri, "--name", "ro"],
             env={**os.environ, **keys}, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    where = uri.replace("/runs?", "/runs/ro?")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: cannot write to {where}: ")
    assert "ACCESS_DENIED" in r.stderr or "Access Denied" in r.stderr
    port = uri.split("127.0.0.1:")[1].split("&")[0]
    fs = pafs.S3FileSystem(access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    assert fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True)) == []  # nothing written


def test_a_local_search_starts_its_own_ray_beside_a_running_cluster(tmp_path, two_nodes):  # noqa: F811
    """``ray start --head`` left running on the machine (the README's cluster section): a search without --address
    uses a Ray instance of its own (it says so) and ends with N trials, none errored."""
    address, _, _ = two_nodes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = _run(["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--num-samples", 3, "--storage", tmp_path,
              "--no-report", "--num-cpus", 2], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ray: a Ray instance of its own on this machine (2 CPUs); a running cluster is joined only with " \
           "--address" in r.stdout
    table = trials_table(tmp_path / "lr")
    assert len(table) == 3 and "errored" not in set(table["outcome"])


RETRY_SPACE = {"search": {"num_samples": 3, "max_epochs": 10, "grace_period": 10, "confirm_top_k": 1,
                          "confirm_seeds": 1},
               "fixed": {"iters_per_epoch": 6, "batch_size": 32, "eval_batch_size": 512},
               "params": {"lr_student": {"type": "float", "low": 0.05, "high": 0.2, "log": True}}}


def test_a_trial_retried_after_a_kill_runs_to_its_end_whatever_tune_had_cached_for_it(tmp_path, ray_address):
    """A driver killed while a trial's save was in flight leaves a STOP cached for it in Tune's saved state (made
    here by writing that state as Tune writes it); the resumed trial runs all its epochs, and the study agrees."""
    from results.journal import open_study
    from results.study import newest_records

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(RETRY_SPACE))
    args = ["--space", tmp_path / "space.yaml", "--storage", tmp_path, "--name", "r", "--no-report",
            "--max-concurrent", 1, "--address", ray_address]
    exp = tmp_path / "r"

    def running_with_a_checkpoint():
        states = sorted(exp.glob("experiment_state-*.json"))
        if not states:
            return None
        try:
            state = json.loads(states[-1].read_text())
        except ValueError:
            return None
        for trial_json, _meta in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "RUNNING" and list((exp / f"trial_{trial['trial_id']}").glob("checkpoint_*")):
                return states[-1], state, trial["trial_id"]
        return None

    first = _popen(args)
    try:
        assert _wait_for(lambda: running_with_a_checkpoint() or first.poll() is not None, timeout=300, every=0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    path, state, victim = running_with_a_checkpoint()
    state["runner_data"]["_cached_trial_decisions"] = {victim: "STOP"}
    path.write_text(json.dumps(state))
    r = _run([*args, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = trials_table(exp).set_index("trial_id")
    assert len(table) == 3 and (table["epochs_run"] == 10).all(), table[["outcome", "epochs_run"]]
    assert (table["outcome"] == "completed").all()
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in newest_records(open_study(exp / "akdtune" /
                                                                                             "study.journal"))}
    assert states == {tid: "COMPLETE" for tid in table.index}
    assert Path(exp / "best" / "trial.json").is_file()


@pytest.fixture
def unshared_folder(tmp_path):
    """A head node and a worker node on this machine, the worker in a mount namespace of its own where the folder
    ``tmp_path/runs`` is an empty tmpfs: a local folder the worker node does not share (as on a second machine)."""
    import shutil
    import tempfile

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (a mount namespace) to give one node a folder of its own")
    runs = tmp_path / "runs"
    runs.mkdir()
    port, env = _free_port(), {**os.environ, "RAY_AUTH_MODE": "disabled"}
    base = Path(tempfile.mkdtemp(prefix="akd-ray-", dir="/tmp"))
    head, worker = base / "h", base / "w"
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 1024 ** 2), "--disable-usage-stats"]
    try:
        subprocess.run([*RAY, "start", "--head", "--port", str(port), "--temp-dir", str(head),
                        "--include-dashboard", "false", *common], check=True, env=env, capture_output=True, timeout=180)
        start = " ".join([*RAY, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(worker), *common])
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs none {runs} && exec {start}"], check=True, env=env, capture_output=True,
                       timeout=180)
        yield f"127.0.0.1:{port}", runs
    finally:
        _kill(_node_processes(worker) | _node_processes(head))
        shutil.rmtree(base, ignore_errors=True)


def test_a_local_folder_that_a_node_does_not_share_is_one_line_and_nothing_is_written(unshared_folder):
    address, runs = unshared_folder
    r = _run(["--space", ROOT / "spaces" / "lr.yaml", "--smoke", "--storage", runs, "--address", address], timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "cannot use the search's storage: it does not see " in r.stderr
    assert "--storage with --address must be a folder every node mounts (NFS), or a URI" in r.stderr
    assert list(runs.iterdir()) == []  # nothing written: not even the driver's lease is left
