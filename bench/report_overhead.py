"""What the live report costs a search: the same search with the report rewritten as trials finish, and not.

Runs ``search/run_search.py --space spaces/capacity.yaml`` (digits) twice per repeat with the same
seed: ``--report-every 0`` (summaries and report written once, at the end) and the default
``--report-every 20`` (rewritten while trials finish, in a background thread of the driver), in
alternating order. Printed: each search's wall time, the live runs' rewrite count and the seconds
the rewrites took (``akdtune/live_report.json``), and the ratio of the walls.

Example::

    python bench/report_overhead.py                       # 8 trials, 1 repeat
    python bench/report_overhead.py --num-samples 16 --repeats 2

The last line is ``ratio=<median wall with the live report / without>``; the goal is <= 1.05.
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

ROOT = Path(__file__).resolve().parents[1]


def one_search(storage: Path, name: str, every: float, num_samples: int, seed: int) -> dict:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "search" / "run_search.py"), "--space",
                        str(ROOT / "spaces" / "capacity.yaml"), "--num-samples", str(num_samples), "--seed", str(seed),
                        "--confirm-top-k", "0", "--storage", str(storage), "--name", name,
                        "--report-every", str(every)], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"search {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    live = storage / name / "akdtune" / "live_report.json"
    return {"wall": wall, "lines": len(r.stdout.splitlines()),
            **(json.loads(live.read_text()) if live.exists() else {"rewrites": 0, "seconds": 0.0})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    walls = {"end only": [], "live": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = [("end only", 0.0), ("live", 20.0)]
            if rep % 2:
                order.reverse()
            for label, every in order:
                res = one_search(Path(tmp), f"{label.replace(' ', '_')}_{rep}", every, args.num_samples, args.seed)
                walls[label].append(res["wall"])
                extra = (f"; {res['rewrites']} rewrites took {res['seconds']:.1f} s "
                         f"({100 * res['seconds'] / res['wall']:.1f}% of the wall, in a background thread)"
                         if label == "live" else "")
                print(f"  repeat {rep}  report {label:<8} wall {res['wall']:6.1f} s  {res['lines']} lines{extra}",
                      flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"median wall: live report {med['live']:.1f} s, end only {med['end only']:.1f} s "
          f"({100 * (med['live'] / med['end only'] - 1):+.1f}%)")
    print(f"ratio={med['live'] / med['end only']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
