"""Shared fixtures. Trained digits teachers are cached across test sessions (``~/.cache/akdtune-tests``, apart
from a user's own cache); Ray is started once per session. Tests that run searches or subprocesses are
marked ``slow``: ``python -m pytest tests -m "not slow"`` is the fast lane."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses (CLI tests, Ray workers) inherit these.
os.environ.setdefault("AKDTUNE_CACHE", str(Path.home() / ".cache" / "akdtune-tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test S3 server (moto, tests/test_storage.py) takes any credentials; Ray's workers, started with the session's
# Ray, inherit them, so they must be set before it starts.
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

torch.set_num_threads(2)


# Tests that use these fixtures run a Ray search: they belong to the slow lane whatever their marks say.
SEARCH_FIXTURES = {"ray_address", "finished_search"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SEARCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_teacher():
    from trainable.tasks import get_task
    from trainable.teacher import prepare_teacher

    teacher, _ = prepare_teacher(get_task("digits"), log=None)
    return teacher


@pytest.fixture(scope="session")
def digits_data():
    from trainable.tasks import get_task, load_eval_data

    return load_eval_data(get_task("digits"))


def tiny_values(**overrides):
    """A digits config that runs in about a second."""
    values = dict(task="digits", epochs=2, iters_per_epoch=2, batch_size=16, n_student=2, n_generator=1,
                  student_fraction=None, student_width=0.25, latent_dim=16, generator_width=8, eval_batch_size=256)
    values.update(overrides)
    return values


class TookTooLong(AssertionError):
    pass


def bounded(seconds: float):
    """A block that fails the test if it is still running after ``seconds`` (an alarm interrupts it): a bound on time
    that the test controls, not a wall time asserted afterwards. Main thread only."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def block():
        def expire(signum, frame):
            raise TookTooLong(f"still running after {seconds} s")

        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return block()


def users_teacher(folder: Path, module: str, source: str):
    """A teacher class ``DigitsNet`` of the user's own in ``folder/<module>.py``, with random weights saved as a user
    would save them (``folder/w.pt``). Returns the module, imported once and forgotten again by this process."""
    import importlib

    (folder / f"{module}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        mod = importlib.import_module(module)
        torch.manual_seed(0)
        torch.save(mod.DigitsNet(10).state_dict(), folder / "w.pt")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module, None)
    return mod


def run_cli(script, *args, cwd=None, timeout=600):
    """The script in a fresh Python process (slow: torch and Ray are imported each time)."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def run_main(script, *args):
    """The script's ``main(argv)`` in this process, with its output captured: what ``run_cli`` checks, in
    milliseconds. Use it for input that is refused before anything runs."""
    import contextlib
    import importlib
    import io
    import subprocess

    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def ray_address():
    """One small local Ray instance for the whole session; in-process searches use it directly,
    subprocess searches join it with --address."""
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 1024 ** 2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
