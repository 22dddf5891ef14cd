"""Shared fixtures. Teachers are cached in a per-session folder; Ray is started once per session."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Subprocesses (CLI tests, Ray workers) inherit these.
os.environ.setdefault("AKDTUNE_CACHE", tempfile.mkdtemp(prefix="akdtune-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_teacher():
    from trainable.teacher import prepare_teacher

    teacher, _ = prepare_teacher("digits", log=None)
    return teacher


@pytest.fixture(scope="session")
def digits_data():
    from trainable.tasks import load_eval_data

    return load_eval_data("digits")


def tiny_values(**overrides):
    """A digits config that runs in about a second."""
    values = dict(task="digits", epochs=2, iters_per_epoch=2, batch_size=16, n_student=2, n_generator=1,
                  student_fraction=None, student_width=0.25, latent_dim=16, generator_width=8, eval_batch_size=256)
    values.update(overrides)
    return values


def run_cli(script, *args, cwd=None, timeout=600):
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def ray_address():
    """One small local Ray instance for the whole session; in-process searches use it directly,
    subprocess searches join it with --address."""
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 1024 ** 2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
