"""What repeatability costs: the default search's wall time in its repeatable mode against ``--asynchronous``.

For each seed, ``python search/run_search.py --space spaces/capacity.yaml --seed S`` runs twice, side by side in
time (the two modes alternate, so that the machine's drift falls on both): once as it is (decisions in the
trials' order, proposals waiting on the trials before them) and once with ``--asynchronous`` (decisions as results
arrive). Printed per seed: each mode's wall time (``wall_s`` of the search record: the whole command but Python's
start), trials stopped early and epochs spent, and each winner's held-out test accuracy.

Example::

    python bench/repeatable_cost.py                 # seeds 0 1 2, about 25 minutes on 2 cores
    python bench/repeatable_cost.py --seeds 0 --space spaces/lr.yaml

The last line is ``ratio=<mean wall, repeatable / asynchronous>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def one_search(space: str, seed: int, storage: Path, asynchronous: bool) -> dict:

    name = f"{'async' if asynchronous else 'repeatable'}_seed{seed}"
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", space, "--seed", str(seed),
                        "--storage", str(storage), "--name", name,
                        *(["--asynchronous"] if asynchronous else [])], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    exp = storage / name
    (storage / f"{name}.log").write_text(r.stdout)
    trials = pd.read_parquet(exp / "summary" / "trials.parquet")
    return {"wall_s": json.loads((exp / "akdtune" / "search.json").read_text())["wall_s"],
            "stopped": int((trials["outcome"] == "stopped_early").sum()), "epochs": int(trials["epochs_run"].sum()),
            "test_acc": json.loads((exp / "best" / "metrics.json").read_text())["test_acc"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--space", default=str(ROOT / "spaces" / "capacity.yaml"))
    p.add_argument("--storage", help="keep the searches and what each printed here (default: a temporary folder)")
    args = p.parse_args(argv)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp)
        storage.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(args.seeds):
            modes = (False, True) if i % 2 == 0 else (True, False)  # alternate which mode runs first
            res = {mode: one_search(args.space, seed, storage, mode) for mode in modes}
            rep, asy = res[False], res[True]
            ratios.append(rep["wall_s"] / asy["wall_s"])
            for label, r in (("repeatable  ", rep), ("asynchronous", asy)):
                print(f"seed {seed} {label}: wall {r['wall_s']:.0f} s, {r['stopped']} stopped early, {r['epochs']} "
                      f"trial-epochs, winner test_acc {r['test_acc']:.4f}", flush=True)
    print(f"over seeds {args.seeds}: repeatable / asynchronous wall x{statistics.fmean(ratios):.2f} "
          f"(per seed {', '.join(f'x{r:.2f}' for r in ratios)})")
    print(f"ratio={statistics.fmean(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
