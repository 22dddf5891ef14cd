"""End of a search: summaries, the best trial evaluated once on the held-out test split, the terminal table."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from results.summary import COMPLETED, ERRORED, STOPPED_EARLY, UNFINISHED, best_trial, load_experiment, write_summaries
from trainable.akd import AKDRun, default_device, load_checkpoint
from trainable.config import build_config
from trainable.outputs import finish_run, write_json
from trainable.tune_trainable import CHECKPOINT_FILE

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 3


def latest_checkpoint(trial_dir: str | Path) -> Path | None:
    """The newest ``checkpoint_NNNNNN/checkpoint.pt`` of a trial folder."""
    found = []
    for d in Path(trial_dir).glob("checkpoint_*"):
        m = re.fullmatch(r"checkpoint_(\d+)", d.name)
        if m and (d / CHECKPOINT_FILE).is_file():
            found.append((int(m.group(1)), d / CHECKPOINT_FILE))
    return max(found)[1] if found else None


def evaluate_best(exp: Path, best: dict[str, Any], teacher, data, teacher_acc: dict, wall_s: float) -> dict[str, Any]:
    """Rebuild the best trial's final student from its checkpoint and evaluate it once on test; write best/."""
    ckpt_path = latest_checkpoint(best["_dir"])
    if ckpt_path is None:
        raise RuntimeError(f"trial {best['trial_id']} has no checkpoint in {best['_dir']}")
    ckpt = load_checkpoint(ckpt_path)
    cfg = build_config(ckpt["config"], task_defaults=False)
    run = AKDRun(cfg, teacher, data, default_device())
    run.load_state_dict(ckpt)
    out = exp / "best"
    final = finish_run(run, out, teacher_acc, wall_s)
    write_json(out / "metrics.json", final)
    write_json(out / "trial.json", {"trial_id": best["trial_id"], "checkpoint": str(ckpt_path),
                                    "epochs": run.epoch, "within_budget": bool(best["within_budget"])})
    return final


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def finish_search(exp: str, results, num_samples: int, teacher, data, teacher_acc: dict, space, wall_s: float,
                  resume_cmd: str, report: bool = True) -> int:
    """Summarise the experiment; on a finished search also evaluate and save the best trial.

    Returns the process exit code: 0 done, 3 interrupted (resumable), 1 when no trial has a result.
    """
    if "://" in exp:
        print(f"search finished; summaries are written for local storage only: run results/report.py on a copy of {exp}")
        return EXIT_OK
    exp_path = Path(exp)
    e = load_experiment(exp_path)
    write_summaries(e)
    counts = {k: int((e.trials["outcome"] == k).sum()) for k in (COMPLETED, STOPPED_EARLY, ERRORED, UNFINISHED)}
    done = counts[COMPLETED] + counts[STOPPED_EARLY] + counts[ERRORED]
    line = (f"trials: {counts[COMPLETED]} completed, {counts[STOPPED_EARLY]} stopped early, "
            f"{counts[ERRORED]} errored" + (f", {counts[UNFINISHED]} unfinished" if counts[UNFINISHED] else ""))
    if done < num_samples:
        print(line)
        if report:
            _report(exp_path)
        print(f"search interrupted: {done} of {num_samples} trials finished. Resume with:\n  {resume_cmd}")
        return EXIT_INTERRUPTED
    best = best_trial(e)
    if best is None:
        print(line)
        print("no trial produced a result; see the error column of summary/trials.parquet")
        if report:
            _report(exp_path)
        return EXIT_ERROR
    final = evaluate_best(exp_path, best, teacher, data, teacher_acc, wall_s)
    searched = [c for c in best if c.startswith("param.")]
    rows = [("best trial", best["trial_id"])]
    rows += [(c.removeprefix("param."), _fmt(best[c])) for c in searched if best[c] is not None]
    rows += [
        ("val_acc", f"{final['val_acc']:.4f}"),
        ("test_acc (held out)", f"{final['test_acc']:.4f}"),
        ("teacher val/test acc", f"{final['teacher_val_acc']:.4f} / {final['teacher_test_acc']:.4f}"),
        ("student params", f"{final['student_params']:,} ({final['param_ratio']:.1%} of {final['teacher_params']:,})"),
        ("trials", line.removeprefix("trials: ")),
        ("wall time", f"{wall_s:.0f} s"),
    ]
    if e.param_budget:
        rows.insert(1, ("parameter budget", f"<= {e.param_budget:.0%} of the teacher"
                        + ("" if best["within_budget"] else "  (NO trial within it: best/ holds the most accurate)")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"best student: {exp_path / 'best'}")
    print(f"summaries:    {exp_path / 'summary'}")
    if report:
        print(f"report:       {_report(exp_path)}")
    return EXIT_OK


def _report(exp: Path) -> Path | None:
    try:
        from results.report import build_report
    except ImportError:
        return None
    return build_report(exp)
