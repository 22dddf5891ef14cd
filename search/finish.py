"""End of a search: confirm the candidates, export the winner (evaluated on the held-out test split), summaries.

``evaluate_run`` rebuilds a run's final student from a checkpoint and measures it on validation
and test; ``export_best`` writes ``best/``; ``print_result`` the terminal summary.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ray.tune import ExperimentAnalysis

from base import metrics as M
from base import storage
from base.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from base.files import write_json
from base.layout import (
    BEST_DIR,
    BEST_METRICS,
    BEST_PARTIAL,
    BEST_TRIAL,
    CONFIRM_RESULTS,
    META_FILE,
    REPORT_FILE,
    STUDY_FILE,
    SUMMARY_DIR,
    TRIALS_TABLE,
    has_tune_state,
    latest_checkpoint,
)
from base.storage import push_changed
from base.verdict import judge, verdict_line
from results.checks import write_best_manifest
from results.limits import describe_limits, refused_over_budget
from results.recordfile import write_record
from results.report import build_report
from results.summary import FINISHED, count_outcomes, load_experiment, outcomes_line, write_summaries
from search.callbacks import update_wall
from search.confirm import choose_winner, confirm_dir, confirmation_plan, load_or_write_plan, summarise_candidate
from search.plan import SearchPlan
from search.prepare import Teacher
from search.searcher import fail_abandoned
from search.tuner import confirm_tuner, fit
from trainable.akd import AKDRun, default_device
from trainable.checkpoint import load_checkpoint
from trainable.config import build_config, config_to_dict
from trainable.outputs import finish_run
from trainable.speed import Speed
from trainable.tune_trainable import CANDIDATE, RUN


def restore_run(ckpt_path: Path, task, teacher, data, data_root: str | None = None) -> AKDRun:
    """The run a checkpoint of a trial of ``task`` (the search's, resolved once) holds, restored."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = build_config(ckpt["config"], task_defaults=False, task=task)
    speed = Speed.from_record(ckpt["speed"]) if isinstance(ckpt.get("speed"), dict) else None  # as it trained
    run = AKDRun(cfg, teacher, data, default_device(), data_root=data_root, speed=speed)
    run.load_state_dict(ckpt)
    return run


def evaluate_run(ckpt_path: Path, task, teacher, data, data_root: str | None = None) -> dict[str, Any]:
    """Validation and held-out test accuracy (agreement, where the run selects on it) of the student in a
    checkpoint, with its epochs and size."""
    run = restore_run(ckpt_path, task, teacher, data, data_root)
    val, test = run.measure("val"), run.measure("test")
    val.pop(M.VAL_LOSS, None)
    return {"seed": run.cfg.seed, "epochs": run.epoch, "checkpoint": str(ckpt_path), **val, **test,
            M.STUDENT_PARAMS: run.student_params, M.PARAM_RATIO: run.student_params / run.teacher_params}


def export_best(exp: Path, winner: dict[str, Any], task, teacher, data, teacher_acc: dict, wall_s: float,
                data_root: str | None = None, selection: str = M.VAL_ACC) -> dict[str, Any]:
    """Write ``best/``: the winner's student (its seed with the highest ``selection`` metric) and the confirmed
    metrics.

    ``metrics.json`` holds the keys of a run's ``final.json``; ``val_acc``/``test_acc`` (and
    ``val_agreement``/``test_agreement`` where the search selected on agreement) are the means over the winner's
    seeds, with ``*_std``, ``seeds``, ``epochs``, and the exported student's own ``student_seed`` and
    ``student_test_acc`` (``student_test_agreement``).
    """
    chosen = max(winner["runs"], key=lambda r: (r[selection], -r["seed"]))
    run = restore_run(exp / chosen["checkpoint"], task, teacher, data, data_root)
    out = exp / BEST_PARTIAL  # written here, then renamed to best/ in one step once complete
    if out.exists():
        shutil.rmtree(out)  # left by a kill during an earlier export
    final = finish_run(run, out, teacher_acc, wall_s)
    own = {f"student_{k}": final[k] for k in (M.TEST_ACC, M.TEST_AGREEMENT) if final.get(k) is not None}
    for key in (M.VAL_ACC, M.TEST_ACC, M.VAL_AGREEMENT, M.TEST_AGREEMENT):
        if f"{key}_mean" in winner:
            final.update({key: winner[f"{key}_mean"], f"{key}_std": winner[f"{key}_std"]})
    final.update({"seeds": winner["seeds"], "epochs": winner["epochs"], "student_seed": chosen["seed"], **own})
    final.update(judge(final, run.history, task.num_classes, config_to_dict(run.cfg)))  # on the means over the seeds
    write_json(out / Path(BEST_METRICS).name, final)
    write_json(out / Path(BEST_TRIAL).name, {"trial_id": winner["trial_id"],
                                    "checkpoint": chosen["checkpoint"],
                                    "epochs": run.epoch, "within_budget": bool(winner["within_budget"])})
    write_best_manifest(out, exp, chosen["checkpoint"])  # what report.py and --resume check it against
    if (exp / BEST_DIR).exists():
        shutil.rmtree(exp / BEST_DIR)  # a best/ without its trial.json: not a finished export
    os.replace(out, exp / BEST_DIR)
    return final


def write_confirmed(exp: Path, results: list[dict[str, Any]], winner_id: str | None) -> None:
    write_record(exp / CONFIRM_RESULTS, {"winner": winner_id, "candidates": results})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_result(best: dict[str, Any], params: dict[str, Any], final: dict[str, Any], results: list[dict],
                 trials_line: str, limits: dict[str, float], wall_s: float, exp: str, report: str | None) -> None:
    rows = [("best trial", best["trial_id"])]
    rows += [(k, _fmt(v)) for k, v in params.items() if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if limits:
        rows.append(("budget", describe_limits(limits)
                     + ("" if best["within_budget"] else "  (NO trial within it: best/ holds the most accurate)")))
    rows += _selection_rows(final)
    rows += [
        ("student params", f"{final['student_params']:,} ({final['param_ratio']:.1%} of {final['teacher_params']:,})"),
        ("trials", trials_line),
        ("wall time", f"{wall_s:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if len(results) > 1:
        print("confirmed candidates (mean ± std over seeds):")
        for r in results:
            mark = "*" if r["trial_id"] == best["trial_id"] else " "
            if not r["runs"]:
                print(f" {mark} {r['trial_id']}  no confirmation run finished {final['epochs']} epochs")
                continue
            key = "acc" if "val_acc_mean" in r else "agreement"
            print(f" {mark} {r['trial_id']}  params {r['param_ratio']:.1%}  val {r[f'val_{key}_mean']:.4f} ± "
                  f"{r[f'val_{key}_std']:.4f}  test {r[f'test_{key}_mean']:.4f} ± {r[f'test_{key}_std']:.4f}  "
                  f"seeds {r['seeds']}" + ("" if key == "acc" else "  (agreement with the teacher)"))
    line = verdict_line(final, "the teacher's held-out accuracy (mean over the seeds)" if final.get(M.TEST_ACC) is not None
                        else "agreement with the teacher on held-out images")
    if line:
        print(line)
    print(f"best student: {storage.join(exp, BEST_DIR)}")
    print(f"summaries:    {storage.join(exp, SUMMARY_DIR)}")
    if report is not None:
        print(f"report:       {report}")


def _selection_rows(final: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's accuracy rows, or its agreement rows and a plain word that no accuracy was measured."""
    n = len(final["seeds"])
    over = f"(mean ± std over {n} seed{'s' * (n > 1)})"
    each = f"(seeds {', '.join(map(str, final['seeds']))}; {final['epochs']} epochs each)"
    rows = []
    if final.get(M.VAL_AGREEMENT) is not None:
        rows += [("selected on", f"val_agreement: agreement with the teacher on {final.get(M.PROXY)}"),
                 (M.VAL_AGREEMENT, f"{final[M.VAL_AGREEMENT]:.4f} ± {final['val_agreement_std']:.4f} {over}"),
                 (M.TEST_AGREEMENT, f"{final[M.TEST_AGREEMENT]:.4f} ± {final['test_agreement_std']:.4f} {each}")]
    if final.get(M.VAL_ACC) is None:
        return rows + [("accuracy", "not measured: the task has no labelled images")]
    return rows + [
        (M.VAL_ACC, f"{final[M.VAL_ACC]:.4f} ± {final['val_acc_std']:.4f} {over}"),
        ("test_acc (held out)", f"{final['test_acc']:.4f} ± {final['test_acc_std']:.4f} {each}"),
        ("teacher val/test acc", f"{final['teacher_val_acc']:.4f} / {final['teacher_test_acc']:.4f}"),
    ]


def _trials_line(e) -> str:
    return outcomes_line(count_outcomes(e.trials["outcome"]), refused_over_budget(Path(e.path) / STUDY_FILE))


def _confirm_trials(cdir: Path) -> list[dict[str, Any]]:
    """(status, run config, folder) of each confirmation trial."""
    if not has_tune_state(cdir):
        return []
    return [{"status": t.status, "run": dict(t.config).get(RUN, {}), "dir": Path(t.path)}
            for t in ExperimentAnalysis(str(cdir)).trials]


def finish_search(plan: SearchPlan, trainable, teacher: Teacher, started: float) -> int:
    """After the search's trials: confirm the candidates, export the winner, write summaries and the report.

    Returns the exit code: 0 done, 3 interrupted (resumable), 1 when no trial succeeded.
    """
    exp = Path(plan.folder)
    _download_tune_files(plan)
    e = load_experiment(exp)
    write_summaries(e)
    line = _trials_line(e)
    done = int(e.trials["outcome"].isin(FINISHED).sum())
    if done < plan.num_samples:
        return _stop(plan, line, EXIT_INTERRUPTED, f"search interrupted: {done} of {plan.num_samples} trials "
                                                   f"finished. Resume with:\n  {plan.resume_command}")
    p = _confirmation_plan(plan, e)
    if not p["candidates"]:
        return _stop(plan, line, EXIT_ERROR, "no trial succeeded: every trial errored or diverged; see the error "
                                             "column of summary/trials.parquet")
    ctrials = _run_confirmation(plan, trainable, p)
    if ctrials is None:
        print(f"search interrupted during confirmation. Resume with:\n  {plan.resume_command}")
        return EXIT_INTERRUPTED
    results = [summarise_candidate(c, _confirmed_runs(plan, teacher, c, ctrials)) for c in p["candidates"]]
    winner = choose_winner(results, e.selection)
    write_confirmed(exp, results, winner["trial_id"] if winner else None)
    if winner is None:
        return _stop(plan, line, EXIT_ERROR, "no trial succeeded: no candidate finished max_epochs in confirmation; "
                                             "see summary/trials.parquet")
    wall_s = update_wall(str(exp / META_FILE)) or (time.time() - started)
    final = export_best(exp, winner, plan.task_spec, teacher.model, teacher.data, teacher.accuracy, wall_s, plan.data_root,
                        e.selection)
    e = load_experiment(exp)
    write_summaries(e)
    best = e.trials[e.trials["trial_id"] == winner["trial_id"]].iloc[0].to_dict()
    params = {c.removeprefix("param."): best[c] for c in best if c.startswith("param.")}
    report = _report(exp, plan.report)
    push_changed(exp)  # a search on a URI: best/, the summaries and the report uploaded (the records already are)
    print_result(best, params, final, results, line, plan.space.limits, wall_s, plan.path,
                 None if report is None else storage.join(plan.path, REPORT_FILE))
    return EXIT_OK


def _download_tune_files(plan: SearchPlan) -> None:
    """A search on a URI: Tune's files of it as they are there now (trial folders, without checkpoints) into the
    working copy, where the summaries read them; the tool's own files are the copy's."""
    mirror = storage.mirror_of(plan.folder)
    if mirror is not None:
        mirror.pull(own=False)


def _checkpoint_of(plan: SearchPlan):
    """Trial folder (of the working copy) -> its newest checkpoint; a search on a URI downloads that one first."""
    mirror = storage.mirror_of(plan.folder)

    def of(trial_dir: str | Path) -> Path | None:
        if mirror is not None:
            mirror.latest_checkpoint_of(Path(os.path.relpath(trial_dir, mirror.work)).as_posix())
        return latest_checkpoint(trial_dir)

    return of


def bring_up_to_date(plan: SearchPlan) -> bool:
    """A finished search killed between its winner's export and its summaries: write them (and the report) now.
    Whether they were out of date (older than ``best/``, or missing)."""
    exp = Path(plan.folder)
    table = exp / TRIALS_TABLE
    if table.is_file() and table.stat().st_mtime >= (exp / BEST_TRIAL).stat().st_mtime:
        return False
    write_summaries(load_experiment(exp))
    _report(exp, plan.report)
    push_changed(exp)
    return True


def _stop(plan: SearchPlan, trials_line: str, code: int, why: str) -> int:
    """End the search early: the trials line, the report of what exists, why, and the exit code."""
    print(f"trials: {trials_line}")
    _report(Path(plan.folder), plan.report)
    push_changed(plan.folder)
    print(why)
    return code


def _confirmation_plan(plan: SearchPlan, e) -> dict[str, Any]:
    """The confirmation's plan, made once from the finished trials and kept (abandoned Optuna trials failed first)."""
    exp = Path(plan.folder)
    fail_abandoned(str(exp / STUDY_FILE), set(e.trials["trial_id"]))
    configs = {r["trial_id"]: r["_config"] for _, r in e.trials.iterrows()}
    return load_or_write_plan(exp, lambda: confirmation_plan(e, configs, plan.confirm_top_k, plan.confirm_seeds,
                                                             plan.max_epochs, _checkpoint_of(plan)))


def _run_confirmation(plan: SearchPlan, trainable, p: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Run (or resume) the confirmation runs; their trials, or None when they were interrupted."""
    if not p["runs"]:
        return []
    cdir = confirm_dir(Path(plan.folder))
    print(f"confirming {len(p['candidates'])} candidate(s) with {p['seeds']} seed(s) each: "
          f"{len(p['runs'])} run(s) to {plan.max_epochs} epochs")
    fit(confirm_tuner(plan, trainable, p["runs"], cdir))
    _download_tune_files(plan)
    ctrials = _confirm_trials(cdir)
    if len(ctrials) < len(p["runs"]) or any(t["status"] not in ("TERMINATED", "ERROR") for t in ctrials):
        return None
    return ctrials


def _confirmed_runs(plan: SearchPlan, teacher: Teacher, cand: dict[str, Any],
                    ctrials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of a candidate's seeds that ran to max_epochs, evaluated from its last checkpoint (a run that diverged or
    failed does not count)."""
    exp, runs, checkpoint_of = Path(plan.folder), [], _checkpoint_of(plan)
    for s in cand["seeds"]:
        own = s == cand["seeds"][0]
        match = [] if own and cand["epochs_run"] >= plan.max_epochs else [
            t for t in ctrials if t["run"].get(CANDIDATE) == cand["trial_id"] and t["run"].get("seed") == s]
        ckpt = checkpoint_of(match[0]["dir"]) if match else None
        if ckpt is None and own:  # the search trial itself: it ran max_epochs, or its continuation had nothing left to
            ckpt = checkpoint_of(exp / cand["trial_dir"])  # train
        if ckpt is None:
            continue
        r = evaluate_run(ckpt, plan.task_spec, teacher.model, teacher.data, plan.data_root)
        r["checkpoint"] = os.path.relpath(ckpt, exp)  # the records hold paths inside the search folder
        if r["epochs"] >= plan.max_epochs:
            runs.append(r)
    return runs


def _report(exp: Path, report: bool) -> Path | None:
    if not report:
        return None

    return build_report(exp)
