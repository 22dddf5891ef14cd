"""A search on a real two-node Ray cluster started with ``ray start`` (a head and one worker node, each with its own
temporary folder and 1 CPU, on this machine): the worker node is killed in the middle of a trial, and the trial goes
on from its last checkpoint on the head; the user's own teacher module, which exists only in the driver's folder,
reaches the worker node through Ray's runtime environment."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, users_teacher

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this Python, wherever its bin/ is

# The user's teacher class; importing it notes where it was imported from, by which process.
MODULE = '''
import os
import torch.nn as nn

with open(IMPORT_LOG, "a") as f:
    f.write(f"{os.getpid()} {__file__}\\n")


class DigitsNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_processes(temp_dir: Path) -> set[int]:
    """The processes of the Ray node whose temporary folder is ``temp_dir``: those started with it (its raylet, and
    for a head its GCS and the rest) and every process they started (its workers)."""
    parents, own = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(temp_dir) in args:
            own.add(int(proc.name))
    return {pid for pid in parents if _descends_from(pid, own, parents)}


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _descends_from(pid: int, ancestors: set[int], parents: dict[int, int] | None = None) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        if pid in ancestors:
            return True
        seen.add(pid)
        if parents is not None:
            pid = parents.get(pid, 0)
            continue
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _raylet(temp_dir: Path) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "raylet/raylet" in args and str(temp_dir) in args:
                return int(proc.name)
    raise AssertionError(f"no raylet of {temp_dir}")


@pytest.fixture
def two_nodes(tmp_path):
    """``ray start --head`` and ``ray start --address`` (one worker node), as the README's cluster section says;
    stopped by their processes (``ray stop`` would stop every Ray on this machine)."""
    import shutil
    import tempfile

    port, env = _free_port(), {**os.environ, "RAY_AUTH_MODE": "disabled"}
    base = Path(tempfile.mkdtemp(prefix="akd-ray-", dir="/tmp"))  # short: Ray's socket paths are at most 107 bytes
    head, worker = base / "h", base / "w"
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 1024 ** 2), "--disable-usage-stats"]
    neutral = tmp_path / "node-cwd"  # the nodes start where the user's module is not
    neutral.mkdir()
    try:
        subprocess.run([*RAY, "start", "--head", "--port", str(port), "--temp-dir", str(head),
                        "--include-dashboard", "false", *common], check=True, env=env, cwd=neutral,
                       capture_output=True, timeout=180)
        subprocess.run([*RAY, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(worker), *common],
                       check=True, env=env, cwd=neutral, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}", head, worker
    finally:
        _kill(_node_processes(worker) | _node_processes(head))
        shutil.rmtree(base, ignore_errors=True)


def test_a_trial_on_a_node_that_dies_goes_on_from_its_checkpoint_on_another(tmp_path, two_nodes):
    address, _, worker = two_nodes
    user = tmp_path / "user"  # the driver's folder: the user's module, weights and space, nowhere else
    user.mkdir()
    log = tmp_path / "imports.log"  # a worker node's processes have its environment, not the driver's: a path
    users_teacher(user, "mynets", f"IMPORT_LOG = {str(log)!r}\n{MODULE}")
    space = {"search": {"num_samples": 2, "max_epochs": 24, "grace_period": 24, "confirm_top_k": 1,
                        "confirm_seeds": 1},
             "fixed": {"iters_per_epoch": 4, "batch_size": 32, "eval_batch_size": 512},
             "params": {"lr_student": {"type": "float", "low": 0.05, "high": 0.2, "log": True}}}
    (user / "space.yaml").write_text(yaml.safe_dump(space))
    # The driver runs elsewhere with the user's folder on its PYTHONPATH: Ray adds the driver's working folder to
    # the sys.path of workers on its own machine, which on this one machine would hide whether the module was shipped.
    driver = tmp_path / "driver"
    driver.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(ROOT), str(user)]),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", user / "space.yaml",
                             "--teacher-model", "mynets:DigitsNet", "--teacher", user / "w.pt", "--storage",
                             user / "runs", "--name", "c", "--no-report", "--address", address], cwd=driver, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    exp, raylet = user / "runs" / "c", _raylet(worker)

    def on_the_worker_node():
        for f in exp.glob("trial_*/result.json"):
            lines = f.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("epoch", 0) >= 2 and _descends_from(json.loads(lines[-1])["pid"],
                                                                                          {raylet}):
                return f.parent.name.removeprefix("trial_")
        return None

    try:
        end, victim = time.time() + 400, None
        while victim is None and time.time() < end and proc.poll() is None:
            victim = on_the_worker_node()
            time.sleep(0.2)
        assert victim, "no trial ran on the worker node in time"
        _kill(_node_processes(worker))  # the node dies: its raylet and its workers
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert f"trial {victim} failed at epoch" in out and "retried from its last checkpoint" in out
    trials = pd.read_parquet(exp / "summary" / "trials.parquet").set_index("trial_id")
    assert len(trials) == 2 and (trials["outcome"] == "completed").all(), trials[["outcome", "error"]]
    assert (trials["epochs_run"] == 24).all()
    epochs = [json.loads(line).get("epoch") for line in (exp / f"trial_{victim}" / "result.json").read_text().splitlines()]
    assert epochs[-1] == 24 and sorted(set(epochs)) == list(range(1, 25))  # it went on; nothing was lost
    # On each node the user's module was imported from the copy Ray's runtime environment shipped there (by the door
    # check and by the trials), the worker node's among them; the driver imports it from the user's folder.
    imports = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    shipped = [path for path in imports if "runtime_resources/py_modules_files" in path]
    assert any(path.startswith(str(worker)) for path in shipped), imports
    assert all(path.startswith(str(user)) for path in imports if path not in shipped), imports
