"""Hyperparameter search over data-free adversarial distillation: Optuna proposes, rungs stop, Ray runs.

Example::

    python search/run_search.py --space spaces/capacity.yaml                # default task: digits
    python search/run_search.py --space spaces/capacity.yaml --resume       # finish an interrupted search
    python search/run_search.py --space spaces/capacity.yaml --task cifar100 --teacher T.pt \\
        --data-root data --gpus-per-trial 0.25
    python search/run_search.py --space spaces/lr.yaml --address auto       # join a running Ray cluster

Writes ``<storage>/<name>/`` (Ray's experiment files, ``summary/*.parquet``, ``best/``,
``report.html``). Exit codes: 0 done; 2 bad input; 3 interrupted (prints the resume command); 1 other.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from base.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UserError,
    full_disk,
    full_disk_line,
    told_unwritable,
)
from base.files import sweep_strays
from base.layout import STUDY_FILE, tune_started
from results.journal import remove_stale_lock
from results.moves import folders_of, relocate
from search.cluster import check_address, check_local_resources, start_ray
from search.estimate import estimate
from search.finish import bring_up_to_date, finish_search
from search.lease import held
from search.plan import check_options, experiment_path, resolve_plan, resume_command, search_name
from search.prepare import (
    budget_check,
    check_trial_builds,
    choose_trial_speed,
    fit_to_teacher,
    prepare_teacher_for,
    typical_trial_config,
)
from search.searcher import mend_study
from search.session import record_session
from search.tuner import build_tuner, fit, make_trainable, restore_tuner, tune_saved_state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Search AKD hyperparameters with Optuna and budget-aware early stopping on Ray Tune.")
    p.add_argument("--space", required=True, help="search space YAML (see spaces/)")
    p.add_argument("--name", help="experiment name (default: the space file's name)")
    p.add_argument("--storage", default="runs", help="where experiments live: a folder or a URI Ray accepts (default runs/)")
    p.add_argument("--work-dir", metavar="DIR", help="a search on a URI: where the driver keeps its working copy of "
                   "the tool's files, each uploaded as it changes (default $AKDTUNE_WORK_DIR, else ~/.cache/akdtune/work)")
    p.add_argument("--resume", action="store_true", help="finish the named, interrupted search")
    p.add_argument("--task", help="task (default: the space's, else digits)")
    p.add_argument("--teacher", help="teacher checkpoint (required except for digits and .pt2 programs)")
    p.add_argument("--teacher-model", metavar="SPEC", help="the teacher's model: a registered name, torchvision:NAME, "
                   "timm:NAME, package.module:callable, or a torch.export program file (.pt2)")
    p.add_argument("--trust-space", action="store_true", help="let the space file name code to import (a model "
                   "package.module:callable in fixed or params); without it such a space is refused before anything "
                   "is imported")
    p.add_argument("--selection", choices=("accuracy", "agreement"), help="what trials are ranked on: validation "
                   "accuracy (needs labels), or agreement with the teacher on held-out images nobody labelled "
                   "(default: accuracy where the task has labels, else agreement)")
    p.add_argument("--data-root", help="folder of the torchvision dataset")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (online)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the space's budget)")
    p.add_argument("--seed", type=int, help="seed of the sampler and of every run (default: the space's, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; torch threads follow (default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractional packs trials (default 1 if CUDA else 0)")
    p.add_argument("--max-concurrent", type=int, default=0, help="cap on trials running at once (0: as resources allow)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial from its checkpoint")
    p.add_argument("--address", help="join a running Ray cluster from one of its nodes: auto, or the head's host:port "
                   "(without it the search starts a Ray instance of its own on this machine; $RAY_ADDRESS counts as "
                   "--address)")
    p.add_argument("--take-over", action="store_true", help="take the search from a driver that holds its lease but "
                   "is gone (e.g. on a machine that was switched off); without it such a lease is taken over after "
                   "it has not been renewed for a few minutes")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--no-early-stopping", action="store_true", help="no early stopping: every trial runs max_epochs")
    p.add_argument("--asynchronous", action="store_true", help="take each decision as soon as its results arrive "
                   "(faster where stragglers are common, e.g. a large cluster) instead of in the trials' order; the "
                   "same command may then give a different search")
    p.add_argument("--confirm-top-k", type=int, help="candidates re-run to max_epochs with extra seeds "
                   "(default: the space's search.confirm_top_k, else 3; 0: off, the best is still finished)")
    p.add_argument("--confirm-seeds", type=int, help="seeds per candidate, its own included (default: the "
                   "space's search.confirm_seeds, else 3)")
    p.add_argument("--estimate", action="store_true", help="print what the search will cost on this machine (time, memory) "
                   "from a few timed iterations of its smallest and largest student, and exit without searching")
    p.add_argument("--repair", action="store_true", help="with --resume: mend the damage to the search's records that "
                   "loses nothing (a study journal whose last record a kill cut short; the confirmation's records, made "
                   "again) and say what was done; other damage is refused in one line")
    p.add_argument("--smoke", action="store_true", help="tiny budgets, for tests")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--report-every", type=float, default=20.0, metavar="SECONDS",
                   help="rewrite the report at most this often while trials finish (default 20; 0: only at the end)")
    p.add_argument("--verbose", action="store_true", help="Ray's own trial tables and worker output as well")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run_search(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before Tune took over SIGINT (preparing the teacher, starting Ray)
        if tune_started(experiment_path(args.storage, search_name(args))):
            print(f"interrupted. Resume with:\n  {resume_command(argv)}", file=sys.stderr)
        else:
            print("interrupted before the search started; run the same command again", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = told_unwritable(e, "pass a --storage (and --name) you can write to")
        if code is not None:
            return code
        full = full_disk(e)
        if full is None:
            raise
        folder = experiment_path(args.storage, search_name(args))
        # --repair: a record the full disk cut at its end (the study journal's last line) is dropped, nothing else
        then = (resume_command([*argv, "--repair"] if "--repair" not in argv else argv)
                if tune_started(folder) else "the same command again")
        print(f"error: {full_disk_line(full, folder, then)}", file=sys.stderr)
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"  # the trials stopped by it: said above, not as tracebacks
        return EXIT_INTERRUPTED


def run_search(args: argparse.Namespace, argv: list[str]) -> int:
    """Setup (plan, teacher, Ray), the search's trials, then the end (confirmation, export, summaries, report)."""
    started = time.time()
    if args.estimate and args.resume:
        raise UserError("--estimate plans a new search; drop --resume (an interrupted search shows its ETA as it runs)")
    check_options(args)
    if args.estimate:  # writes nothing: no lease
        return _run_search(args, argv, started, None)
    # One driver per search: nothing of the search is read or written before its lease is this driver's
    with held(experiment_path(args.storage, search_name(args)), search_name(args), resume_command(argv),
              args.take_over) as lease:
        return _run_search(args, argv, started, lease)


def _run_search(args: argparse.Namespace, argv: list[str], started: float, lease) -> int:
    plan = resolve_plan(args, argv)  # every setting and every check that needs no Ray; nothing written yet
    for note in plan.space.notes:
        print(f"note: {note}")
    if plan.resume:  # a trial's end that reached the scheduler's record and not the study's (a kill, a cut journal)
        told = mend_study(plan.folder, plan.objectives)
        if told:
            print(f"told the study how {len(told)} finished trial(s) ended, from the scheduler's record: "
                  f"{', '.join(told)}")
    if plan.finished:
        if bring_up_to_date(plan):  # killed after its winner's export, before its summaries
            print("the summaries were older than the winner in best/: written again")
        print(f"search {plan.name!r} is finished; nothing to resume. Its results: {plan.path}")
        return EXIT_OK
    check_local_resources(plan)  # a trial bigger than this machine: one line, before anything starts
    if plan.address:  # a cluster address that does not answer: one line before the teacher and the speed step
        check_address(plan.address)
    if plan.resume:  # a copied or moved search: what Tune restores writes here, never where it was copied from
        relocate(folders_of(plan.record), plan.folder)
        remove_stale_lock(plan.file(STUDY_FILE))  # a kill while the study was being appended to
        sweep_strays(plan.folder)  # temporary files a kill left where no writer comes again (abandoned trials)
    teacher = prepare_teacher_for(plan)
    plan = fit_to_teacher(plan, teacher)  # the recipe fitted to what the teacher offers, said in one line
    # A resumed search is restored from what Tune saved of it; one killed before Tune saved anything starts its
    # trials again (its study, scheduler and search records are kept).
    restored = plan.resume and tune_saved_state(plan)
    # A new search's budget check (a space with no setting within its budget stops here); a restored one's
    # searcher carries its own.
    check = None if restored else budget_check(plan, teacher)
    typical = typical_trial_config(plan)
    if not plan.resume:
        check_trial_builds(plan, teacher, typical)  # a setting that cannot make a run stops here, before Ray
    speed = choose_trial_speed(plan, teacher, typical)  # measured once here (or cached), used by every trial
    print(speed.describe(), flush=True)
    if args.estimate:
        estimate(plan, teacher, speed, check)
        return EXIT_OK
    start_ray(plan, lease)
    record_session(plan, teacher, speed, started)
    trainable = make_trainable(plan, teacher, speed)
    tuner = restore_tuner(plan, trainable) if restored else build_tuner(plan, trainable, check)
    fit(tuner)
    return finish_search(plan, trainable, teacher, started)


if __name__ == "__main__":
    sys.exit(main())
