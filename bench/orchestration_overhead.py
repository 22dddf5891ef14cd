"""Orchestration overhead: one digits configuration as a Ray Tune trial against the same run without Ray.

Both run the digits default recipe once, alternately, ``--repeats`` times:
- direct: ``trainable/run_akd.py`` (its ``final.json`` wall_s, and the whole command);
- Tune: a one-trial search through ``search/run_search.py`` with no early stopping (the trial's
  own ``time_total_s``, and the whole command, which adds Ray's start-up, paid once per search).

Example::

    python bench/orchestration_overhead.py --repeats 2

The last line is ``ratio=<Tune trial wall / direct run wall>`` (1.10 = 10% overhead per trial).
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
ONE_POINT = {"objective": {"metric": "val_acc", "mode": "max"},
             "budget": {"num_samples": 1, "max_epochs": 30, "grace_period": 30, "confirm_top_k": 0},
             "params": {"seed": {"type": "fixed", "value": 0}}}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    direct, tune, direct_cmd, tune_cmd = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "one.yaml").write_text(yaml.safe_dump(ONE_POINT))
        # The Tune trial gets the same two CPU threads the direct run uses.
        for i in range(args.repeats):
            out = tmp / f"direct{i}"
            direct_cmd.append(timed([sys.executable, "trainable/run_akd.py", "--task", "digits", "--out", str(out),
                                     "--threads", "2"]))
            direct.append(json.loads((out / "final.json").read_text())["wall_s"])
            tune_cmd.append(timed([sys.executable, "search/run_search.py", "--space", str(tmp / "one.yaml"),
                                   "--storage", str(tmp / "runs"), "--name", f"one{i}", "--no-report",
                                   "--cpus-per-trial", "2", "--no-early-stopping"]))
            trial = next((tmp / "runs" / f"one{i}").glob("trial_*"))
            last = json.loads((trial / "result.json").read_text().splitlines()[-1])
            tune.append(last["time_total_s"])
    d, t = statistics.median(direct), statistics.median(tune)
    dc, tc = statistics.median(direct_cmd), statistics.median(tune_cmd)
    print(f"digits default recipe, {args.repeats} repeats, medians")
    print(f"  run wall:     direct {d:6.1f} s   Tune trial {t:6.1f} s   overhead {100 * (t - d) / t:+.1f}% of the trial")
    print(f"  whole command: direct {dc:6.1f} s   one-trial search {tc:6.1f} s   (Ray start-up and teardown, "
          "paid once per search)")
    print(f"ratio={t / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
