"""A search's settings, resolved once: ``SearchPlan``.

Every setting of a search is decided here, in one place, with one precedence::

    command line  >  the resumed search's record (akdtune/search.json)  >  --smoke  >  the space file

and every check that can be made without Ray (options, paths, the resume record, the space) runs
here, before anything is written. The rest of the search reads the plan and nothing else: a
setting keeps the name it has in the space file (``max_epochs``, ``grace_period``,
``reduction_factor``, ``confirm_top_k``, ...) from the YAML to the report.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base import metrics as M
from base import storage
from base.errors import UserError
from base.layout import BEST_TRIAL, CONFIRM_RESULTS, META_FILE, is_own, tune_started
from results.checks import RETELL, check_records
from results.recordfile import read_record
from results.repair import repair_records
from search.space import CONFIRM_BOUNDS, Space, load_space
from trainable.proxy import selection_metric
from trainable.sources import as_spec
from trainable.tasks import Task

# --smoke: the whole pipeline at a size a test suite can afford.
SMOKE_CONFIG = dict(iters_per_epoch=2, batch_size=32, eval_batch_size=512)
SMOKE_BUDGET = dict(num_samples=3, max_epochs=3, grace_period=1, reduction_factor=2, confirm_top_k=1,
                    confirm_seeds=2)


@dataclass(frozen=True)
class SearchPlan:
    """What one invocation of ``run_search.py`` will do (a new search or the resume of one)."""

    name: str
    storage: str
    path: str  # <storage>/<name>: a local folder (absolute) or a URI
    space: Space
    seed: int
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    early_stopping: bool
    asynchronous: bool  # --asynchronous: decisions in the order results arrive (not repeatable)
    confirm_top_k: int
    confirm_seeds: int
    teacher_path: str | None
    teacher_model: str | None  # --teacher-model: the teacher's model spec over the space's and the task's
    selection: str | None  # --selection: accuracy | agreement over the space's (None: the space's, else auto)
    data_root: str | None
    download: bool
    smoke: bool
    cpus_per_trial: float
    gpus_per_trial: float | None  # None: 1 where CUDA is available, else 0 (decided where torch is imported)
    max_concurrent: int  # 0: as resources allow
    max_failures: int
    address: str | None
    num_cpus: int | None
    report: bool
    verbose: bool  # Ray's tables and worker logs as well as our progress lines
    report_every_s: float  # the live report: at most one rewrite per this many seconds; 0: only at the end
    resume: bool
    resume_command: str  # the command that finishes this search if it is interrupted
    record: dict[str, Any] | None = None  # the resumed search's akdtune/search.json
    finished: bool = False  # resuming a search that already finished: nothing to do
    work: str | None = None  # a search on a URI: the driver's working copy of it (base.storage.Mirror)

    @property
    def task(self) -> str:
        return self.space.task

    @property
    def task_spec(self) -> Task:
        """The search's task, resolved once (where its space was read): every config of the search is built with it."""
        return self.space.task_spec

    @property
    def local(self) -> bool:
        """Whether the search's storage is a local (or NFS) folder, not a URI."""
        return not storage.is_uri(self.path)

    @property
    def folder(self) -> str:
        """The local folder the tool's own files are written in and read from: the search folder, or for a search
        on a URI the driver's working copy of it (each file uploaded as it changes)."""
        return self.work or self.path

    def file(self, name: str) -> Path:
        """A file of the search, in :attr:`folder`, e.g. ``plan.file(META_FILE)``."""
        return Path(self.folder) / name

    @property
    def trial_config(self) -> dict[str, Any]:
        """The config every trial starts from; the searcher adds the sampled hyperparameters."""
        implied = {"selection": "agreement"} if self.space.objectives[0][0] == M.VAL_AGREEMENT else {}
        return {"task": self.task, "seed": self.seed, "epochs": self.max_epochs, **implied, **self.space.fixed,
                **({"teacher": self.teacher_model} if self.teacher_model else {}),
                **({"selection": self.selection} if self.selection else {}), **(SMOKE_CONFIG if self.smoke else {})}

    @property
    def selection_metric(self) -> str:
        """What the search selects on: ``val_acc``, or ``val_agreement`` where it selects without labels."""

        return selection_metric(self.trial_config.get("selection", "auto"), self.task_spec)

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """The space's objectives with the selection metric first (the rungs, the sampler and the confirmation)."""
        return ((self.selection_metric, "max"), *self.space.objectives[1:])

    def record_fields(self) -> dict[str, Any]:
        """The plan's part of the search record written when a search starts."""
        return {"space_file": self.space.path, "space": self.space.raw, "task": self.task, "seed": self.seed,
                "num_samples": self.num_samples, "teacher": self.teacher_path,
                "teacher_model": self.teacher_model, "selection": self.selection, "data_root": self.data_root,
                "smoke": self.smoke, "max_epochs": self.max_epochs, "grace_period": self.grace_period,
                "reduction_factor": self.reduction_factor, "early_stopping": self.early_stopping,
                "asynchronous": self.asynchronous,
                "confirm_top_k": self.confirm_top_k, "confirm_seeds": self.confirm_seeds}


def experiment_path(where: str, name: str) -> str:
    """``<storage>/<name>``: an absolute local folder, or the URI with the name added (its query kept)."""
    if storage.is_uri(where):
        return storage.join(where, name)
    return str(Path(where).expanduser().resolve() / name)


def resume_command(argv: list[str]) -> str:
    """The command that finishes this search, run from the folder this one runs in (its paths are relative to it)."""
    script = Path(__file__).resolve().with_name("run_search.py")
    try:
        shown = str(script.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(script)
    args = [a for a in argv if a != "--resume"]
    return f"python {shlex.quote(shown)} " + " ".join(shlex.quote(a) for a in args) + " --resume"


MAX_NAME_BYTES = 200  # a folder name (most filesystems allow 255 bytes; the working copy of a URI adds 13)


def check_options(args: argparse.Namespace) -> None:
    """Every option that can be checked without Ray, before anything is written. Raises UserError."""

    def bad(flag: str, v, need: str):
        raise UserError(f"{flag} {v} is invalid: {need}")

    if args.num_samples is not None and args.num_samples < 1:
        bad("--num-samples", args.num_samples, "must be >= 1")
    if not math.isfinite(args.cpus_per_trial) or args.cpus_per_trial <= 0:
        bad("--cpus-per-trial", args.cpus_per_trial, "must be > 0")
    if args.gpus_per_trial is not None and (not math.isfinite(args.gpus_per_trial) or args.gpus_per_trial < 0
                                            or (args.gpus_per_trial > 1 and not args.gpus_per_trial.is_integer())):
        bad("--gpus-per-trial", args.gpus_per_trial, "must be >= 0; a fraction only below 1 (e.g. 0.25)")
    if args.max_concurrent < 0:
        bad("--max-concurrent", args.max_concurrent, "must be >= 0 (0: as resources allow)")
    if getattr(args, "repair", False) and not args.resume:
        raise UserError("--repair mends the records of a search being resumed; add --resume")
    if args.max_failures < 0:
        bad("--max-failures", args.max_failures, "must be >= 0")
    if args.num_cpus is not None and args.num_cpus < 1:
        bad("--num-cpus", args.num_cpus, "must be >= 1")
    if args.address and args.address.startswith("ray://"):
        raise UserError(f"--address {args.address}: Ray Client (ray://) is not supported; run the search on a node of "
                        "the cluster with --address auto (or the head's host:port, e.g. 10.0.0.1:6379)")
    if args.num_cpus is not None and args.address:
        raise UserError("--num-cpus sets up a local Ray; it cannot be combined with --address")
    if not math.isfinite(args.report_every) or args.report_every < 0:
        bad("--report-every", args.report_every, "must be >= 0 seconds (0: the report is written at the end only)")
    for key, (low, high) in CONFIRM_BOUNDS.items():
        v = getattr(args, key)
        if v is not None and not low <= v <= high:
            bad("--" + key.replace("_", "-"), v, f"must be in [{low}, {high}]")
    name = search_name(args)
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UserError(f"--name {name!r} is invalid: a search name is one folder name inside --storage "
                        "(letters, digits, '-', '_'; no '/' or '..')")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UserError(f"--name is {len(name.encode('utf-8'))} bytes long: a folder name may have at most "
                        f"{MAX_NAME_BYTES}; pass a shorter --name")
    if "://" not in args.storage:
        storage = Path(args.storage).expanduser()
        if storage.exists() and not storage.is_dir():
            raise UserError(f"--storage {args.storage} is a file, not a folder; pass a folder for the searches")
        probe = storage if storage.exists() else next((p for p in storage.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"--storage {args.storage}: {probe} is not writable; pass a folder you can write to")
        if (storage / name).exists() and not (storage / name).is_dir():
            raise UserError(f"{storage / name} is a file; pass another --name")
        if args.resume and (storage / name).is_dir() and not os.access(storage / name, os.W_OK | os.X_OK):
            raise UserError(f"cannot resume: {storage / name} is read-only; make it writable or copy it")


def cluster_address(args: argparse.Namespace) -> str | None:
    """The cluster the search joins: ``--address``, else ``$RAY_ADDRESS`` (set by the user, or by Ray for a job
    submitted to a cluster); None: a Ray instance of the search's own."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


def search_name(args: argparse.Namespace) -> str:
    return args.name or Path(args.space).stem


def _read_record(path: Path, name: str, repair: bool) -> dict:
    """The resumed search's record, after every record of its folder is checked (``--repair``: mended first where
    that loses nothing). Raises UserError (DamagedRecord) before anything is written."""
    folder = path.parent.parent
    if repair:
        for line in repair_records(folder):
            print(f"repaired {line}")
    # --repair: finished trials the study still has running are told again as the resume starts (mend_study)
    damaged = [d for d in check_records(folder) if not (repair and d.repair == RETELL)]
    if damaged:
        raise damaged[0]
    found = read_record(path)
    if found is None:
        raise UserError(f"cannot resume {name!r}: {path} is missing (was the search started by this tool?); restore it "
                        "from a copy of the search folder, or start a new search with --name")
    return found


def _pick(key: str, cli, record: dict | None, smoke: bool, space_value):
    """One setting: the command line > the resumed search's record > --smoke > the space."""
    if cli is not None:
        return cli
    if record is not None and record.get(key) is not None:
        return record[key]
    if smoke and key in SMOKE_BUDGET:
        return SMOKE_BUDGET[key]
    return space_value


def _selection(args: argparse.Namespace, record: dict | None, name: str) -> str | None:
    """--selection, which a resume may repeat but not change."""
    chosen = getattr(args, "selection", None)
    if record is not None:
        if chosen not in (None, record.get("selection")):
            raise UserError(f"search {name!r} was started with --selection {record.get('selection') or 'as its space says'}"
                            "; resume it without --selection, or start a new search with --name")
        return record.get("selection")
    return chosen


def resolve_plan(args: argparse.Namespace, argv: list[str]) -> SearchPlan:
    """Check the command line, the resume record and the space; decide every setting. Starts nothing."""
    check_options(args)
    name = search_name(args)
    path = experiment_path(args.storage, name)
    exists = tune_started(path)
    if exists and not args.resume and not getattr(args, "estimate", False):
        raise UserError(f"a search named {name!r} already exists in {args.storage}; pass --resume to finish it, "
                        "or --name NEW to start another")
    if args.resume and not exists:
        raise UserError(f"nothing to resume: no search named {name!r} in {args.storage}; drop --resume to start it")
    work = None if not storage.is_uri(path) or getattr(args, "estimate", False) else \
        _working_copy(path, name, args.resume, getattr(args, "work_dir", None))
    folder = work or path
    record = _read_record(Path(folder, META_FILE), name, getattr(args, "repair", False)) if args.resume else None
    teacher_model = as_spec(args.teacher_model or (record or {}).get("teacher_model"))
    space = load_space(args.space, args.task or (record or {}).get("task"),  # validated before Ray starts
                       trust_code=bool(getattr(args, "trust_space", False)), trusted_specs=frozenset({teacher_model}))
    if record is not None and record["space"] != space.raw:
        raise UserError(f"{args.space} has changed since the search {name!r} started; restore the original "
                        "space to resume, or start a new search with --name")
    if record is not None and args.num_samples not in (None, record["num_samples"]):
        raise UserError(f"search {name!r} was started with --num-samples {record['num_samples']}; resume it with "
                        "the same number")

    def pick(key: str, cli=None):
        return _pick(key, cli, record, args.smoke, getattr(space, key))

    max_epochs = pick("max_epochs")
    early_stopping = not args.no_early_stopping if record is None else record.get("early_stopping", True)
    teacher = args.teacher or (record or {}).get("teacher")
    return SearchPlan(
        name=name, storage=args.storage, path=path, space=space, seed=pick("seed", args.seed),
        num_samples=pick("num_samples", args.num_samples), max_epochs=max_epochs,
        grace_period=min(pick("grace_period"), max_epochs), reduction_factor=pick("reduction_factor"),
        early_stopping=early_stopping, confirm_top_k=pick("confirm_top_k", args.confirm_top_k),
        asynchronous=bool(getattr(args, "asynchronous", False)) if record is None else bool(record.get("asynchronous", True)),
        confirm_seeds=pick("confirm_seeds", args.confirm_seeds),
        teacher_path=os.path.abspath(teacher) if teacher else None,
        teacher_model=teacher_model,
        selection=_selection(args, record, name),
        data_root=args.data_root or (record or {}).get("data_root"), download=args.download, smoke=args.smoke,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
        max_failures=args.max_failures, address=cluster_address(args), num_cpus=args.num_cpus, report=not args.no_report,
        verbose=args.verbose, report_every_s=args.report_every,
        resume=args.resume, resume_command=resume_command(argv), record=record,
        finished=bool(record is not None and Path(folder, CONFIRM_RESULTS).exists() and Path(folder, BEST_TRIAL).is_file()),
        work=work,
    )


def _working_copy(uri: str, name: str, resume: bool, root: str | None) -> str:
    """The driver's working copy of the search at ``uri``, made from the URI alone (emptied, then for a resume every
    file but the checkpoints downloaded), attached so that each of the tool's files written into it is uploaded."""
    mirror = storage.Mirror(uri, storage.work_folder(uri, name, root), is_own)
    mirror.check()
    mirror.reset()
    if resume:
        mirror.pull(checkpoints="none")
    storage.attach(mirror)
    return str(mirror.work)

