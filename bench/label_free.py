"""How good a stand-in for accuracy is agreement with the teacher? Measured on digits, where labels exist.

For each seed, the default space (``spaces/capacity.yaml``) is searched twice with the real command:

(a) ``--selection accuracy``: trials ranked, stopped and confirmed on validation accuracy (the default);
(b) ``--selection agreement``: ranked, stopped and confirmed on ``val_agreement``, the student's agreement with
    the teacher on a frozen generator's images: what a user without a single labelled or unlabelled image gets
    (a folder task with only a task.yaml selects exactly so). The labels are still there, so every trial's
    val_acc is recorded beside its val_agreement; the search never reads it.

Printed per seed and over the seeds:

- Spearman's rho between val_agreement and val_acc over (b)'s trials, at the first rung (every trial that did
  not fail reached it; one fidelity) and at each trial's last epoch;
- the held-out test_acc of each search's exported winner (the mean over its confirmation seeds): picked by
  agreement against picked by accuracy, with each winner's size, and each search's wall time.

Example::

    python bench/label_free.py                 # seeds 0 1 2, about 25 minutes on 2 cores
    python bench/label_free.py --seeds 0 --num-samples 6

The last line is ``ratio=<mean winner test_acc, agreement - accuracy, in points>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 pairs or a constant side."""
    if len(xs) < 3:
        return float("nan")

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def search(selection: str, seed: int, storage: Path, space: Path, extra: list[str]) -> dict:
    """One real search; its winner's metrics, its trials and epochs tables and its wall time."""
    name = f"{selection}_seed{seed}"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(space), "--seed",
                        str(seed), "--selection", selection, "--storage", str(storage), "--name", name, "--no-report",
                        *extra], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"the {selection} search of seed {seed} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    exp = storage / name
    return {"best": json.loads((exp / "best" / "metrics.json").read_text()), "wall_s": wall,
            "trials": pd.read_parquet(exp / "summary" / "trials.parquet"),
            "epochs": pd.read_parquet(exp / "summary" / "epochs.parquet"),
            "grace": json.loads((exp / "akdtune" / "search.json").read_text())["grace_period"]}


def rank_agreement(s: dict) -> tuple[float, float, int]:
    """(rho at the first rung, rho at each trial's last epoch, trials) of an agreement search."""
    e = s["epochs"]
    at = e[(e["epoch"] == s["grace"]) & e["val_acc"].notna() & e["val_agreement"].notna()]
    t = s["trials"]
    t = t[t["final_val_acc"].notna() & t["final_val_agreement"].notna()]
    return (spearman(at["val_agreement"].tolist(), at["val_acc"].tolist()),
            spearman(t["final_val_agreement"].tolist(), t["final_val_acc"].tolist()), len(t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--space", default=str(ROOT / "spaces" / "capacity.yaml"))
    p.add_argument("--num-samples", type=int, help="trials per search (default: the space's)")
    p.add_argument("--storage", help="keep the searches here (default: a temporary folder)")
    args = p.parse_args(argv)
    extra = ["--num-samples", str(args.num_samples)] if args.num_samples else []
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp)
        rows = []
        for seed in args.seeds:
            acc = search("accuracy", seed, storage, Path(args.space), extra)
            agr = search("agreement", seed, storage, Path(args.space), extra)
            rho_rung, rho_last, n = rank_agreement(agr)
            rows.append((seed, rho_rung, rho_last, n, acc, agr))
            print(f"seed {seed}: rho(val_agreement, val_acc) over {n} trials: {rho_rung:+.2f} at epoch {agr['grace']}, "
                  f"{rho_last:+.2f} at each trial's last epoch", flush=True)
            for label, s in (("picked by accuracy ", acc), ("picked by agreement", agr)):
                b = s["best"]
                print(f"  {label}: test_acc {b['test_acc']:.4f} ± {b['test_acc_std']:.4f}, params "
                      f"{b['param_ratio']:.1%}, val_acc {b['val_acc']:.4f}"
                      + (f", val_agreement {b['val_agreement']:.4f}" if b.get("val_agreement") is not None else "")
                      + f"; search wall {s['wall_s']:.0f} s", flush=True)
    mean = statistics.fmean
    acc_t = [r[4]["best"]["test_acc"] for r in rows]
    agr_t = [r[5]["best"]["test_acc"] for r in rows]
    print(f"over seeds {args.seeds}: rho {mean([r[1] for r in rows]):+.2f} at the first rung, "
          f"{mean([r[2] for r in rows]):+.2f} at the last epoch; winner test_acc by accuracy {mean(acc_t):.4f}, "
          f"by agreement {mean(agr_t):.4f}; wall by accuracy {mean([r[4]['wall_s'] for r in rows]):.0f} s, "
          f"by agreement {mean([r[5]['wall_s'] for r in rows]):.0f} s")
    print(f"ratio={100 * (mean(agr_t) - mean(acc_t)):+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
