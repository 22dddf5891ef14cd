"""Search efficiency on digits: the project's early stopping (ASHA rungs) against no early stopping.

The same space, sampler seed and trial count are searched twice through ``search/run_search.py``:
once with the project's scheduler (one objective: ASHA's rule), once with every trial run to
max_epochs. Printed: total epochs spent, wall time, the best validation accuracy each finds, and
the epochs and seconds each needed to first reach within 1 point of the best accuracy either finds.

Example::

    python bench/search_efficiency.py
    python bench/search_efficiency.py --num-samples 24

The last line is ``ratio=<epochs spent with early stopping / epochs spent without>``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]

SPACE = {
    "description": "search-efficiency benchmark: learning rates and student size on digits",
    "objective": {"metric": "val_acc", "mode": "max"},
    # confirm_top_k 0: compare the search phase only (the best is still finished to max_epochs).
    "budget": {"num_samples": 32, "max_epochs": 16, "grace_period": 1, "reduction_factor": 4, "confirm_top_k": 0},
    "fixed": {"iters_per_epoch": 10},
    "params": {
        "lr_student": {"type": "float", "low": 0.005, "high": 0.5, "log": True},
        "lr_generator": {"type": "float", "low": 0.0001, "high": 0.01, "log": True},
        "student_fraction": {"type": "float", "low": 0.03, "high": 0.3, "log": True},
    },
}


def run_search(space_file: Path, storage: Path, name: str, extra: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space", str(space_file),
                        "--storage", str(storage), "--name", name, "--no-report", *extra],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"search {name} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - start


def timeline(exp: Path) -> pd.DataFrame:
    """Every reported epoch of every trial in the order they were reported, with cumulative epochs."""
    rows = []
    for trial_dir in exp.glob("trial_*"):
        for line in (trial_dir / "result.json").read_text().splitlines():
            r = json.loads(line)
            rows.append({"trial": trial_dir.name, "epoch": r["epoch"], "val_acc": r["val_acc"],
                         "timestamp": r["timestamp"], "time_total_s": r["time_total_s"]})
    df = pd.DataFrame(rows).sort_values(["timestamp", "trial", "epoch"]).reset_index(drop=True)
    df["epochs_spent"] = range(1, len(df) + 1)
    return df


def to_target(df: pd.DataFrame, target: float, start_ts: float) -> tuple[int | None, float | None]:
    hit = df[df["val_acc"] >= target]
    if hit.empty:
        return None, None
    first = hit.iloc[0]
    return int(first["epochs_spent"]), float(first["timestamp"] - start_ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=SPACE["budget"]["num_samples"])
    p.add_argument("--storage", help="keep the two experiments here (default: a temporary folder)")
    args = p.parse_args(argv)
    space = json.loads(json.dumps(SPACE))
    space["budget"]["num_samples"] = args.num_samples
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp)
        storage.mkdir(parents=True, exist_ok=True)
        space_file = storage / "efficiency.yaml"
        space_file.write_text(yaml.safe_dump(space))
        results = {}
        for name, extra in (("asha", []), ("full", ["--no-early-stopping"])):
            start_ts = time.time()
            wall = run_search(space_file, storage, name, extra)
            results[name] = (timeline(storage / name), wall, start_ts)
        best = max(df["val_acc"].max() for df, _, _ in results.values())
        target = best - 0.01
        b = space["budget"]
        print(f"digits, {args.num_samples} trials, max {b['max_epochs']} epochs, ASHA grace {b['grace_period']} "
              f"reduction {b['reduction_factor']}; best val_acc found by either: {best:.4f}; target {target:.4f}")
        for name, (df, wall, start_ts) in results.items():
            ep, secs = to_target(df, target, start_ts)
            reach = f"reached the target after {ep} epochs, {secs:.0f} s" if ep else "never reached the target"
            print(f"  {'early stopping' if name == 'asha' else 'no early stopping':<28} "
                  f"epochs {len(df):>4}  wall {wall:6.1f} s  best val_acc {df['val_acc'].max():.4f}  {reach}")
        asha, full = results["asha"][0], results["full"][0]
        print(f"epochs ratio (early stopping / none): {len(asha) / len(full):.3f}; "
              f"wall ratio: {results['asha'][1] / results['full'][1]:.3f}")
        print(f"ratio={len(asha) / len(full):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
