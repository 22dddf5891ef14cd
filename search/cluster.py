"""Where trials run: Ray started (or joined), the resources a trial asks for checked against the machine or the
cluster, and a trial's device and threads."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import site
import socket
import sys
import sysconfig
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from base.errors import UserError
from search.lease import check_proof
from search.plan import SearchPlan
from trainable.sources import kind, user_folder_importable


def trial_threads(plan: SearchPlan) -> int:
    """torch's intra-op threads in a trial: its CPUs, so that trials side by side do not oversubscribe the cores."""
    return max(1, int(round(plan.cpus_per_trial)))


def trial_device(plan: SearchPlan):
    """Where a trial computes: CUDA where the trials get GPUs and CUDA is present, else the CPU."""
    return torch.device("cuda") if gpus_per_trial(plan) > 0 and torch.cuda.is_available() else torch.device("cpu")


def gpus_per_trial(plan: SearchPlan) -> float:
    if plan.gpus_per_trial is not None:
        return plan.gpus_per_trial
    return 1.0 if torch.cuda.is_available() else 0.0


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when a cluster address given as host:port does not answer."""
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
    if plan.address or ray.is_initialized():
        return
    check_resources(plan, plan.num_cpus or os.cpu_count() or 1, torch.cuda.device_count())


def check_cluster(plan: SearchPlan) -> None:
    """The resources a trial asks for exist in the running Ray cluster."""
    total = ray.cluster_resources()
    check_resources(plan, total.get("CPU", 0), total.get("GPU", 0))


def start_ray(plan: SearchPlan, lease=None) -> None:
    """Start a Ray instance of the search's own on this machine, or join the cluster at ``--address`` (the project
    and the user's modules shipped to it, every node checked, ``lease``'s search folder seen from each); say which
    in one line. A cluster already running on this machine is never joined without ``--address``."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a diverged run reports no val_acc
    if not plan.verbose:  # our progress lines instead of Tune's tables, banners and per-trial warnings

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output engine: silent at verbose=0
        # Tune's own error lines too: a failed trial is reported once by the progress view, in one line, and its
        # traceback is in its error.txt (--verbose shows Tune's logging).
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    joined = "the Ray instance this process already runs"
    if not ray.is_initialized():
        # A teacher or student given as package.module:callable is imported by every trial: the folder the
        # search runs from is importable there as it is here (a local Ray's workers inherit this environment).
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if os.getcwd() not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, paths)])
        if plan.address:
            check_address(plan.address)
            init = dict(address=plan.address, runtime_env={"py_modules": shipped_code(plan), "excludes": SHIP_EXCLUDES})
        else:  # "local": a new instance, even where `ray start` left a cluster running on this machine
            init = dict(address="local", num_cpus=plan.num_cpus, include_dashboard=False)
        try:  # workers' logs (a line per checkpoint) reach the terminal only with --verbose
            ray.init(log_to_driver=plan.verbose, configure_logging=False, **init)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or join Ray ({str(e).splitlines()[0][:200]}); check --address") from None
        joined = f"joined the cluster at {plan.address}" if plan.address else "a Ray instance of its own on this machine"
    check_cluster(plan)
    if plan.address:
        check_nodes(plan, lease)
    total, nodes = ray.cluster_resources(), [n for n in ray.nodes() if n.get("Alive")]
    where = (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, " if plan.address else "") + \
        f"{total.get('CPU', 0):g} CPUs" + (f", {total.get('GPU', 0):g} GPUs" if total.get("GPU") else "")
    print(f"ray: {joined} ({where})" + ("; the project and your modules shipped, every node checked" if plan.address
                                       else "; a running cluster is joined only with --address"), flush=True)


PROJECT_PACKAGES = ("base", "trainable", "search", "results")
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


def _installed(path: Path) -> bool:
    """Whether ``path`` belongs to the Python installation (the standard library or an installed package): a node has
    it from its own pip packages."""
    roots = {sys.prefix, sys.base_prefix, *site.getsitepackages(), site.getusersitepackages(),
             *(sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))}
    return any(path.is_relative_to(Path(r).resolve()) for r in roots if r)


def _module_path(name: str) -> Path | None:
    """The file or folder of the top-level module ``name`` as this driver imports it, or None."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:
        locations = list(found.submodule_search_locations)
        return Path(locations[0]).resolve() if len(locations) == 1 else None
    return Path(found.origin).resolve() if found.origin and found.origin.endswith(".py") else None


def code_specs(plan: SearchPlan) -> list[str]:
    """The teacher and student specs of the search that name code (``package.module:callable``)."""
    found, stack = [], [plan.teacher_model, plan.space.raw]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += list(v.values())
        elif isinstance(v, (list, tuple)):
            stack += list(v)
        elif isinstance(v, str) and kind(v) == "callable" and all(
                part.replace(".", "").isidentifier() for part in v.partition(":")[::2]):
            found.append(v)
    return sorted(set(found))


def shipped_code(plan: SearchPlan) -> list[str]:
    """What reaches every node of the cluster through Ray's runtime environment (``py_modules``): this project's
    packages as this driver runs them, and the user's own modules that the specs name (a file or folder of theirs,
    not an installed package). A node then needs only the same pip packages."""
    user_folder_importable()  # the specs' modules are found as the trials' build finds them
    project = [p for p in (_module_path(n) for n in PROJECT_PACKAGES) if p is not None]
    own = []
    for spec in code_specs(plan):
        path = _module_path(spec.partition(":")[0].split(".")[0])
        if path is not None and not _installed(path) and path not in project and path not in own:
            own.append(path)
    # a file of theirs imports a sibling file (``import helpers`` beside ``mynets.py``): the modules the driver
    # imported from the same folders go too
    folders = {p.parent for p in own if p.is_file()}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or not file:
            continue
        path = Path(file).resolve()
        path = path.parent if path.name == "__init__.py" else path
        if path.parent in folders and path not in own and path not in project and not _installed(path):
            own.append(path)
    return [str(p) for p in [*project, *own]]


def _node_check(specs: list[str], folder: str | None = None, proof: tuple[str, str] | None = None) -> dict:
    """On one node: the project's trial code and every spec imported, the versions that must match the driver's,
    and the search ``folder`` seen as the driver sees it (its lease, ``proof``) and writable."""
    out = {"torch": torch.__version__, "errors": [], "storage": None}
    if folder is not None and proof is not None:
        out["storage"] = check_proof(folder, *proof)
    for spec in ["trainable.tune_trainable:akd_trial", *specs]:
        module, _, attr = spec.partition(":")
        try:
            if not callable(getattr(importlib.import_module(module), attr, None)):
                out["errors"].append(f"{module!r} has no callable {attr!r} for {spec!r}")
        except Exception as e:  # noqa: BLE001 - the node's own reason, reported in one line
            out["errors"].append(f"cannot import {module!r} for {spec!r} ({type(e).__name__}: {str(e)[:160]})")
    return out


def check_nodes(plan: SearchPlan, lease=None, timeout_s: float = 300.0) -> None:
    """The door check of a cluster: on every live node, one task imports the trials' code and the search's teacher
    and student specs (shipped with the runtime environment) and reports its torch version. A node that cannot run
    a trial stops the search here in one line, before any trial starts."""
    specs = code_specs(plan)
    task = ray.remote(num_cpus=0)(_node_check)
    proof = lease.proof() if lease is not None else None
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(specs, plan.path, proof)
        for n in nodes}
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"a node of the cluster at {plan.address} did not answer the import check within "
                        f"{timeout_s:.0f} s; check `ray status`") from None
    except ray.exceptions.RayError as e:
        raise UserError(f"a node of the cluster at {plan.address} cannot start this search's code "
                        f"({str(e).splitlines()[0][:200]}); every node needs the packages of requirements.txt") from None
    for node, answer in answers.items():
        if answer.get("storage"):
            shared = "a URI every node can reach" if not plan.local else \
                "a folder every node mounts (NFS), or a URI such as s3://bucket/runs"
            raise UserError(f"node {node} cannot use the search's storage: {answer['storage']}; --storage with "
                            f"--address must be {shared}")
        if answer["errors"]:
            raise UserError(f"node {node} cannot run a trial: {answer['errors'][0]}; every node needs the packages "
                            "of requirements.txt (this project and your own modules are shipped to it)")
        if answer["torch"] != torch.__version__:
            raise UserError(f"node {node} has torch {answer['torch']} where this driver has {torch.__version__}; "
                            "install the same packages on every node (requirements.txt)")


def trials_at_once(plan: SearchPlan) -> int:
    """Trials side by side: the CPUs (or GPUs) of the running Ray cluster, or of this machine before Ray starts,
    over a trial's share, capped by --max-concurrent."""
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
