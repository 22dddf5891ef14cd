"""Where trials run: Ray started (or joined), the resources a trial asks for checked against the machine or the
cluster, and a trial's device and threads."""
from __future__ import annotations

import os

from search.plan import SearchPlan
from trainable.errors import UserError


def trial_threads(plan: SearchPlan) -> int:
    """torch's intra-op threads in a trial: its CPUs, so that trials side by side do not oversubscribe the cores."""
    return max(1, int(round(plan.cpus_per_trial)))


def trial_device(plan: SearchPlan):
    """Where a trial computes: CUDA where the trials get GPUs and CUDA is present, else the CPU."""
    import torch

    return torch.device("cuda") if gpus_per_trial(plan) > 0 and torch.cuda.is_available() else torch.device("cpu")


def gpus_per_trial(plan: SearchPlan) -> float:
    import torch

    if plan.gpus_per_trial is not None:
        return plan.gpus_per_trial
    return 1.0 if torch.cuda.is_available() else 0.0


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when a cluster address given as host:port does not answer."""
    import socket

    hostport = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError):
        raise UserError(f"--address {address}: nothing answers there within {timeout_s:.0f} s; start the cluster "
                        "(ray start --head) or pass its address") from None


def check_resources(plan: SearchPlan, cpus: float, gpus: float) -> None:
    """A trial's CPUs and GPUs exist among ``cpus`` and ``gpus`` (else trials would wait forever). Raises UserError."""
    if plan.cpus_per_trial > cpus:
        raise UserError(f"--cpus-per-trial {plan.cpus_per_trial:g} but the Ray cluster has {cpus:g} CPUs; lower it")
    if gpus_per_trial(plan) > gpus:
        raise UserError(f"--gpus-per-trial {gpus_per_trial(plan):g} but the Ray cluster has {gpus:g} GPUs; pass "
                        "--gpus-per-trial 0 to run on CPUs")


def check_local_resources(plan: SearchPlan) -> None:
    """Where the search starts its own Ray, the cluster is this machine: a trial that asks for more than it has is
    refused at once, before the teacher, the speed measurement or Ray start."""
    import ray
    import torch

    if plan.address or ray.is_initialized():
        return
    check_resources(plan, plan.num_cpus or os.cpu_count() or 1, torch.cuda.device_count())


def check_cluster(plan: SearchPlan) -> None:
    """The resources a trial asks for exist in the running Ray cluster."""
    import ray

    total = ray.cluster_resources()
    check_resources(plan, total.get("CPU", 0), total.get("GPU", 0))


def start_ray(plan: SearchPlan) -> None:
    """Start a local Ray (or join ``--address``) unless one is running in this process, then check resources."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a diverged run reports no val_acc
    if not plan.verbose:  # our progress lines instead of Tune's tables, banners and per-trial warnings
        import logging

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output engine: silent at verbose=0
        # Tune's own error lines too: a failed trial is reported once by the progress view, in one line, and its
        # traceback is in its error.txt (--verbose shows Tune's logging).
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if not ray.is_initialized():
        # A teacher or student given as package.module:callable is imported by every trial: the folder the
        # search runs from is importable there as it is here (a local Ray's workers inherit this environment).
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if os.getcwd() not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, paths)])
        if plan.address:
            check_address(plan.address)
        init = dict(address=plan.address) if plan.address else dict(num_cpus=plan.num_cpus, include_dashboard=False)
        try:  # workers' logs (a line per checkpoint) reach the terminal only with --verbose
            ray.init(log_to_driver=plan.verbose, configure_logging=False, **init)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or join Ray ({str(e).splitlines()[0][:200]}); check --address") from None
    check_cluster(plan)


def trials_at_once(plan: SearchPlan) -> int:
    """Trials side by side: the CPUs (or GPUs) of the running Ray cluster, or of this machine before Ray starts,
    over a trial's share, capped by --max-concurrent."""
    import ray
    import torch

    gpus = gpus_per_trial(plan)
    if ray.is_initialized():
        total = ray.cluster_resources()
        n = int(total.get("GPU", 0) // gpus) if gpus > 0 else int(total.get("CPU", 1) // plan.cpus_per_trial)
    elif trial_device(plan).type == "cuda":
        n = int(torch.cuda.device_count() // gpus)
    else:
        n = int((plan.num_cpus or os.cpu_count() or 1) // plan.cpus_per_trial)
    n = max(1, n)
    return min(n, plan.max_concurrent) if plan.max_concurrent else n
