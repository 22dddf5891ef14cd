"""What a person sees while a search runs: one compact live view instead of Ray's tables.

``SearchProgress`` is a Tune ``Callback`` (Tune's public reporting interface). It counts trials
finished / running / stopped / failed of N and epochs done, estimates the time left from measured
epoch times and the scheduler's remaining work, keeps the best student within the budget so far,
and prints one line per finished trial. In a terminal a tqdm bar redraws in place; anywhere else
(CI, a pipe, a log file) it prints plain lines and nothing else, so a default search stays under
about 60 lines. A failed trial is always reported, with its reason.

It can also keep the report current: every ``report_every_s`` seconds after a trial finishes it asks
a background thread to rewrite the Parquet summaries and ``report.html`` (atomically), so the
report can be opened while the search runs.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from tqdm import tqdm

from base import metrics as M
from base import storage
from base.files import write_json
from base.layout import LIVE_REPORT_FILE
from results.limits import refused_over_budget, within_limits
from results.moves import here
from results.report import build_report
from results.resultlog import read_result_lines, result_log
from results.schedule_record import scheduler_record, stop_decisions
from results.summary import COMPLETED, DIVERGED, ERRORED, STOPPED_EARLY
from search.scheduler import expected_epochs


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def short_params(config: dict[str, Any], names: list[str]) -> str:
    parts = []
    for n in names:
        v = config.get(n)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts.append(f"{n}={v:.3g}" if isinstance(v, float) else f"{n}={v}")
    return " ".join(parts)


STATUS_EVERY_S = 30.0  # the longest a search stays silent while trials run
FAILED = "failed"  # the live view's word for a trial that diverged or errored


class SearchProgress(Callback):
    """Compact progress of a search (see the module docstring).

    Args:
        num_samples: trials of the search.
        max_epochs: epochs of a full trial.
        milestones: the scheduler's rung epochs ([] without early stopping).
        reduction_factor: the scheduler's eta.
        limits: the space's budget {metric: upper limit}; trials over it are not "best within the budget".
        params: names of the searched hyperparameters, shown per finished trial.
        state_file: the scheduler's state file, read for its stop decisions when a trial ends.
        study_file: the study's journal, read for the settings refused over the budget (shown in the status).
        report_dir: the search folder whose summaries and report are rewritten as trials finish (None: not).
        report_every_s: at most one rewrite per this many seconds.
        confirm_runs: confirmation runs that will follow (counted in the ETA as full-length runs).
        label: what a unit is called in the lines ("trial", "confirmation run").
        selection: the metric trials are ranked on (``val_acc``, or ``val_agreement`` without labels).

    Everything is plain data: Tune pickles its callbacks with the experiment, and a resumed search
    gets this object back.
    """

    def __init__(self, num_samples: int, max_epochs: int, milestones: list[int], reduction_factor: float,
                 limits: dict[str, float] | None, params: list[str], state_file: str | None = None,
                 report_dir: str | None = None, report_every_s: float = 20.0, confirm_runs: int = 0,
                 label: str = "trial", study_file: str | None = None, selection: str = M.VAL_ACC):
        self.num_samples = num_samples
        self.selection = selection
        self.max_epochs = max_epochs
        self.per_trial = expected_epochs(max_epochs, milestones, reduction_factor, num_samples)
        self.limits = dict(limits or {})
        self.params = params
        self.state_file = state_file
        self.study_file = study_file
        self.report_dir = report_dir
        self.report_every_s = report_every_s
        self.confirm_runs = confirm_runs
        self.label = label
        self.stream = sys.stdout
        self._reset()

    def _reset(self) -> None:
        self.start = time.time()
        self.epochs: dict[str, int] = {}  # trial id -> epochs reported
        self.finished: dict[str, str] = {}  # trial id -> outcome word
        self.epoch_times: list[float] = []
        self.bests: dict[str, tuple[float, float]] = {}  # trial id -> its best (selection metric, param_ratio)
        self.bar = None
        self._pending = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_report = 0.0
        self.reports, self.report_s = 0, 0.0  # rewrites of the live report and the seconds they took
        self.peak_running = 0  # the most trials seen running at once
        self.refused = 0  # settings refused over the budget so far (read from the study when a trial starts)
        self._last_line = time.time()  # when the last line was printed (a status follows STATUS_EVERY_S of silence)

    def __getstate__(self):  # Tune pickles callbacks into its experiment state: the settings, not the threads
        keep = ("num_samples", "max_epochs", "per_trial", "limits", "params", "state_file", "study_file",
                "report_dir", "report_every_s", "confirm_runs", "label", "selection")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, d):
        self.__dict__.update(d)
        for key in ("state_file", "study_file", "report_dir"):  # a copied or moved search writes into its new folder
            setattr(self, key, here(getattr(self, key)))
        self.stream = sys.stdout
        self._reset()

    def stopped(self) -> dict[str, dict]:
        if not self.state_file:
            return {}

        return stop_decisions(self.state_file)

    # -- what is printed
    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _line(self, text: str) -> None:
        self._last_line = time.time()
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def counts(self) -> dict[str, int]:
        """How many trials ended each way so far (the outcomes of the trials table; failed: diverged or errored)."""
        c = {COMPLETED: 0, STOPPED_EARLY: 0, DIVERGED: 0, ERRORED: 0}
        for outcome in self.finished.values():
            c[outcome] += 1
        return {**c, FAILED: c[DIVERGED] + c[ERRORED]}

    def eta_s(self, running: int) -> float | None:
        """Seconds left: the search's remaining epochs at the measured pace, then the confirmation runs."""
        if not self.epoch_times:
            return None
        done_trials = len(self.finished)
        per_trial = self.per_trial
        ended = [self.epochs.get(t, 0) for t in self.finished]
        if len(ended) >= 3:  # what trials actually ran so far corrects the schedule's estimate
            per_trial = 0.5 * per_trial + 0.5 * sum(ended) / len(ended)
        in_flight = sum(e for t, e in self.epochs.items() if t not in self.finished)
        left = max(0.0, (self.num_samples - done_trials) * per_trial - in_flight)
        left += self.confirm_runs * self.max_epochs
        pace = sorted(self.epoch_times)[len(self.epoch_times) // 2]  # median seconds per epoch per trial
        return left * pace / max(1, running, self.peak_running)  # trials run side by side as before

    def status(self, running: int) -> str:
        c = self.counts()
        eta = self.eta_s(running)
        best = self.best
        best = (f"best so far {self.selection} {best[0]:.4f} at {best[1]:.1%} params ({best[2]})"
                if best else "no result yet")
        return (f"{len(self.finished)}/{self.num_samples} done ({c[COMPLETED]} completed, {c[STOPPED_EARLY]} stopped "
                f"early, {c[FAILED]} failed), {running} running | epochs {sum(self.epochs.values())} | "
                f"elapsed {fmt_duration(time.time() - self.start)}"
                + (f", ETA {fmt_duration(eta)}" if eta is not None else "") + f" | {best}"
                + (f" | {self.refused} over the budget refused" if self.refused else ""))

    def _count_refused(self) -> None:
        """Re-read the refused count. Refusals happen only when the searcher proposes a trial, so this runs when
        a trial starts (and at setup, for a resumed search), not on every result."""
        if not self.study_file:
            return

        try:
            self.refused = refused_over_budget(self.study_file)
        except Exception:  # the journal is being written: the next trial's start counts them
            pass

    def _restore_earlier_sessions(self) -> None:
        """The outcomes, epochs and best results of the trials of earlier sessions, from the scheduler's record and
        the search's own log of every result (epochs after a rung's stop decision do not count, as in the table)."""
        state = scheduler_record(self.state_file)
        for tid, decision in state["stopped"].items():
            self.finished[tid] = DIVERGED if decision.get("reason") == DIVERGED else STOPPED_EARLY
        for tid in state["finished"]:
            self.finished.setdefault(tid, COMPLETED)
        folder = Path(self.state_file).parent.parent
        for tid in {*state["finished"], *state["stopped"], *(state.get("order") or [])}:
            cut = (state["stopped"].get(tid) or {}).get(M.EPOCH)
            for r in read_result_lines(result_log(folder, tid)):
                if M.EPOCH in r and (cut is None or int(r[M.EPOCH]) <= int(cut)):
                    self._count(tid, r)
            final = state["finished"].get(tid) or {}
            if final.get(M.EPOCH):
                self.epochs[tid] = max(self.epochs.get(tid, 0), int(final[M.EPOCH]))

    def _count(self, trial_id: str, result: dict) -> None:
        """A trial's epochs so far and its best result within the limits, with ``result`` counted."""
        self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result[M.EPOCH]))
        acc, ratio = result.get(self.selection), result.get(M.PARAM_RATIO)
        mine = self.bests.get(trial_id)
        if acc is not None and within_limits(result, self.limits) and (mine is None or acc > mine[0]):
            self.bests[trial_id] = (float(acc), float(ratio or 0.0))

    # -- Tune's callback interface
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._reset()
        if self.state_file:  # a resumed search: the trials its earlier sessions finished count as done
            self._restore_earlier_sessions()
            if self.finished:
                print(f"resumed: {len(self.finished)} of {self.num_samples} {self.label}s were finished before",
                      file=self.stream, flush=True)
        self._count_refused()
        if self.tty:

            self.bar = tqdm(total=self.num_samples, initial=len(self.finished), unit="trial", file=self.stream,
                            dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} trials {postfix}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._count_refused()

    def on_step_end(self, iteration, trials, **info):
        """While trials run and nothing else was said for ``STATUS_EVERY_S``: the status line (trials running, their
        epochs, the ETA), so a search is never silent for long, its first trials included."""
        if time.time() - self._last_line < STATUS_EVERY_S:
            return
        running = self._running(trials)
        if not running:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(running), refresh=True)
            self._last_line = time.time()
        else:
            self._line(f"      {self.status(running)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if M.EPOCH not in result:
            return
        if result.get("time_this_iter_s"):
            self.epoch_times.append(float(result["time_this_iter_s"]))
        self._count(trial.trial_id, result)
        self.peak_running = max(self.peak_running, self._running(trials))
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(self._running(trials)), refresh=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        decision = (self.stopped() or {}).get(trial.trial_id)
        last = trial.last_result or {}
        if last.get(M.DIVERGED) or (decision or {}).get("reason") == DIVERGED:
            self._finish(trials, trial, DIVERGED, f"diverged: {str(last.get(M.ERROR, ''))[:120]}")
        elif decision:
            where = f"stopped at epoch {decision.get('epoch', self.epochs.get(trial.trial_id, '?'))}"
            if decision.get("position"):
                where += f" (rung: {decision['position']} of {decision.get('of', '?')})"
            self._finish(trials, trial, STOPPED_EARLY, where)
        else:
            self._finish(trials, trial, COMPLETED, f"completed {self.epochs.get(trial.trial_id, 0)} epochs")

    def on_trial_recover(self, iteration, trials, trial, **info):
        retries = trial.max_failures if trial.max_failures >= 0 else "unlimited"
        epoch = self.epochs.get(trial.trial_id, 0)
        self._line(f"      {self.label} {trial.trial_id} failed at epoch {epoch} (its worker or node lost, or see its "
                   f"error.txt): retried from its last checkpoint, failure {trial.run_metadata.num_failures} of "
                   f"{retries} allowed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trials, trial, ERRORED, "ERRORED (see its error.txt; summary/trials.parquet has the reason)")

    @property
    def best(self) -> tuple[float, float, str] | None:
        """(selection metric, param_ratio, trial id) of the best result so far within the limits, failed trials left
        out (a trial that errored or diverged is never the best)."""
        ok = [(v[0], v[1], tid) for tid, v in self.bests.items() if self.finished.get(tid) not in (DIVERGED, ERRORED)]
        return max(ok, key=lambda b: b[0]) if ok else None

    def _running(self, trials) -> int:
        return sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in self.finished)

    def _finish(self, trials, trial, outcome: str, what: str) -> None:
        if trial.trial_id in self.finished:
            return
        self.finished[trial.trial_id] = outcome
        last = trial.last_result or {}
        acc = last.get(self.selection)
        ratio = last.get(M.PARAM_RATIO)
        detail = (f"{self.selection} {acc:.4f}" if isinstance(acc, (int, float)) else f"no {self.selection}") + (
            f" params {ratio:.1%}" if isinstance(ratio, (int, float)) else "") + (
            f" GENERATOR COLLAPSED ({last[M.GEN_CLASSES]:.1f} effective classes)" if last.get(M.GEN_COLLAPSED) else "")
        line = (f"[{len(self.finished):>{len(str(self.num_samples))}}/{self.num_samples}] {self.label} "
                f"{trial.trial_id} {what}: {detail}  {short_params(trial.config, self.params)}").rstrip()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.status(self._running(trials)), refresh=True)
            self._line(line)
        else:  # plain lines: the status every few trials keeps a search near 60 lines
            self._line(line)
            every = max(1, self.num_samples // 6)
            if len(self.finished) % every == 0 or len(self.finished) == self.num_samples:
                self._line(f"      {self.status(self._running(trials))}")
        self._request_report()

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._stop_worker()
        if self.report_dir is not None:  # what the live report cost (bench/report_overhead.py reads it)
            write_json(Path(self.report_dir) / LIVE_REPORT_FILE, {"rewrites": self.reports, "seconds": self.report_s,
                                                                  M.WALL_S: time.time() - self.start})

    # -- the live report
    def on_progress(self) -> None:
        done = len(self.finished)
        mirror = storage.mirror_of(self.report_dir)  # a search on a URI: Tune's files as they are there now
        if mirror is not None:
            mirror.pull(own=False)
        build_report(self.report_dir, in_progress=f"{done} of {self.num_samples} {self.label}s finished")
        storage.push_changed(self.report_dir)

    def _request_report(self) -> None:
        if self.report_dir is None:
            return
        if self._worker is None:
            self._stopping = threading.Event()
            self._worker = threading.Thread(target=self._report_loop, name="akdtune-report", daemon=True)
            self._worker.start()
        self._pending.set()

    def _report_loop(self) -> None:
        """Rewrite the report when asked, at most every ``report_every_s``; ends at once when stopped."""
        while True:
            self._pending.wait()
            wait = self._last_report + self.report_every_s - time.time()
            if self._stopping.is_set() or (wait > 0 and self._stopping.wait(wait)):
                return  # the search is over: finish_search writes the final report
            self._pending.clear()
            self._last_report = time.time()
            try:
                self.on_progress()
                self.reports += 1
                self.report_s += time.time() - self._last_report
            except Exception as e:  # the report is a view: a failure to draw it never stops the search
                self._line(f"      (report not updated: {type(e).__name__}: {str(e)[:120]})")

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._stopping.set()
            self._pending.set()
            self._worker.join(timeout=60)  # at most the end of a rewrite in progress
            self._worker = None
