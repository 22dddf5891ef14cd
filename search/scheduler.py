"""Early stopping that follows a space's objectives and budget: multi-objective ASHA on Tune's public API.

``RungScheduler`` is asynchronous successive halving (ASHA, one bracket) whose rung decisions use
the space's objective vector, as in multi-objective ASHA (MOASHA, Schmucker et al. 2021):

- Rungs sit at ``grace_period * reduction_factor**k`` epochs below ``max_epochs``.
- When a trial reaches a rung its objective vector (e.g. ``(val_acc, param_ratio)``) is recorded
  there and the rung's records are ranked: feasible before infeasible (a trial over the space's
  parameter budget ranks after every trial within it, infeasible ones by how far over), then by
  non-dominated front, then by crowding distance (the extremes of a front first; between equally
  crowded trials, the better first objective). The trial goes
  on if its position is in the top ``ceil(n / reduction_factor)``, else it is stopped, where ``n``
  counts the rung's records within the budget for a trial within it (over-budget trials neither
  push it out nor make room for it), and all records for a trial over the budget (which always
  ranks behind those within it). With one objective and no budget this is plain ASHA's top-1/eta
  rule.
- A trial whose run diverged (a non-finite loss) is stopped at once, with that reason.

Its state is plain data (``results.schedule_record.empty_scheduler_record``), the single record of its decisions: it
is written atomically, with a checksum, to ``state_file`` *before* a decision takes effect and read back on
restore, and a trial it stopped, saw finish or saw fail for good is never trained again (a resumed search stops such a trial
before Tune starts it). The scheduler builds on Tune's public ``FIFOScheduler``; nothing reads
Ray's ASHA internals.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from base import metrics as M
from base.errors import DiskFull, full_disk
from base.internals import forget_cached_decision
from results.limits import dominates
from results.moves import here
from results.recordfile import write_record
from results.schedule_record import scheduler_record
from search.space import limit_violation


# --------------------------------------------------------------------------- ranking (pure functions)
def nondominated_fronts(points: list[Sequence[float]]) -> list[int]:
    """Front index of each point (0 = not dominated by any point), all objectives minimised."""
    n = len(points)
    front = [-1] * n
    remaining = set(range(n))
    level = 0
    while remaining:
        current = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in current:
            front[i] = level
        remaining -= current
        level += 1
    return front


def crowding_distances(points: list[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance of each point within its set (the extremes get infinity)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for pos in range(1, n - 1):
            dist[order[pos]] += (points[order[pos + 1]][k] - points[order[pos - 1]][k]) / (hi - lo)
    return dist


def rank_records(records: dict[str, dict[str, Any]], modes: Sequence[str], ordered: bool = False) -> list[str]:
    """Trial ids of one rung, best first.

    Each record is ``{"values": [objective values], "violation": how far over the budget (0 if within)}``.
    Order: feasible first (infeasible by violation), then non-dominated front, then crowding
    distance (largest first), then the first objective (the selection metric), then the trial id, or with
    ``ordered`` the records' own order (the trials' order in a repeatable search: Ray's ids are random).
    """
    ids = list(records) if ordered else sorted(records)
    place = {t: i for i, t in enumerate(ids)}
    signs = [-1.0 if m == "max" else 1.0 for m in modes]

    def minimised(tid: str) -> tuple[float, ...]:
        vals = records[tid]["values"]
        return tuple(s * v if v is not None and math.isfinite(v) else math.inf for s, v in zip(signs, vals))

    key: dict[str, tuple] = {}
    groups: dict[float, list[str]] = {}
    for tid in ids:
        groups.setdefault(float(records[tid].get("violation", 0.0)), []).append(tid)
    for violation, members in groups.items():
        pts = [minimised(t) for t in members]
        fronts = nondominated_fronts(pts)
        crowd = [0.0] * len(members)
        for f in set(fronts):
            idx = [i for i, fi in enumerate(fronts) if fi == f]
            for i, d in zip(idx, crowding_distances([pts[i] for i in idx])):
                crowd[i] = d
        for i, tid in enumerate(members):
            key[tid] = (violation > 0, violation, fronts[i], -crowd[i], pts[i][0], place[tid])
    return sorted(ids, key=lambda t: key[t])


def keeps(n: int, reduction_factor: float) -> int:
    """How many of a rung's ``n`` records go on: the top 1/eta, at least one."""
    return max(1, math.ceil(n / reduction_factor - 1e-9))


def milestones(grace_period: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """Rung epochs: grace, grace*eta, ... strictly below max_epochs."""
    out, t = [], float(grace_period)
    while round(t) < max_epochs:
        if not out or round(t) > out[-1]:
            out.append(int(round(t)))
        t *= reduction_factor
    return out


def expected_epochs(max_epochs: int, rungs: list[int], reduction_factor: float, trials: int) -> float:
    """Mean epochs per trial under asynchronous successive halving: every trial runs to the first rung; a trial
    reaching a rung as the k-th of its n arrivals goes on when it ranks in the top ceil(k / eta) of the k seen so
    far, which in random order happens with probability ceil(k / eta) / k, so early arrivals are promoted more
    often than 1/eta (about 0.42 of 16 trials at eta 3). Without rungs, ``max_epochs``. The one survival model of
    the search: the estimate's and the live view's ETA."""
    total, n, last = 0.0, float(trials), 0
    for r in [*rungs, max_epochs]:
        total += n * (r - last)
        k = max(1, round(n))
        n *= sum(math.ceil(i / reduction_factor) / i for i in range(1, k + 1)) / k
        last = r
    return total / trials


# --------------------------------------------------------------------------- the scheduler
def retry_errored(state_file: str) -> list[str]:
    """The trials the record has as errored for good (their retries spent), forgotten there so that a resume trains
    them again from their last checkpoint (``Tuner.restore(resume_errored=True)``): their Ray ids, in the record's
    order. The record is written only where it changes."""
    st = scheduler_record(state_file)
    errored = list(st.get("errored") or {})
    if errored:
        st["errored"] = {}
        write_record(state_file, st)
    return errored


class RungScheduler(FIFOScheduler):
    """Multi-objective, budget-aware ASHA (see the module docstring).

    Args:
        objectives: ``[(metric, "max"|"min"), ...]``; the first is the selection metric.
        max_epochs: epochs of a full run (``search.max_epochs``).
        grace_period: first rung.
        reduction_factor: eta; the top 1/eta of a rung goes on.
        param_budget: shorthand for ``limits={"param_ratio": param_budget}``.
        limits: the space's budget {metric: upper limit} (``param_ratio``, ``flops``): trials over it rank
            after every trial within it, by how far over.
        state_file: where the state is written (JSON); None keeps it in memory only.
        early_stopping: False records rungs but never stops (every trial runs ``max_epochs``).
        repeatable: decisions follow the trials' order, not the order their results arrive in: trial k's
            decision at a rung ranks it among trials 0..k only, and is taken once each of trials 0..k-1 has
            reached that rung or ended before it (until then trial k is paused, its checkpoint kept). The same
            command then gives the same decisions however the trials interleave (``search.searcher`` proposes
            settings the same way). The order is the searcher's (``set_order``), kept in the record.
    """

    def __init__(self, objectives: Sequence[tuple[str, str]], max_epochs: int, grace_period: int,
                 reduction_factor: float, param_budget: float | None = None, state_file: str | None = None,
                 early_stopping: bool = True, limits: dict[str, float] | None = None, repeatable: bool = False):
        super().__init__()
        self.objectives = [(str(m), str(d)) for m, d in objectives]
        self.max_epochs = int(max_epochs)
        self.milestones = milestones(grace_period, reduction_factor, max_epochs) if early_stopping else []
        self.reduction_factor = float(reduction_factor)
        self.limits = {**(limits or {}), **({M.PARAM_RATIO: float(param_budget)} if param_budget is not None else {})}
        self.state_file = state_file
        self.repeatable = repeatable
        self._state: dict[str, Any] | None = None  # loaded lazily, so an unpickled copy reads the file

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_state"] = None  # the file, not a pickled snapshot, is the record
        return d

    def __setstate__(self, d):
        if "limits" not in d:  # pickled by an earlier version: the budget was param_budget alone
            budget = d.pop("param_budget", None)
            d["limits"] = {M.PARAM_RATIO: float(budget)} if budget is not None else {}
            d.setdefault("max_epochs", d.pop("max_t", None))
        d.setdefault("repeatable", False)  # pickled before searches were repeatable
        self.__dict__.update(d)
        self.state_file = here(self.state_file)  # a copied or moved search writes into its new folder

    # -- state
    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = scheduler_record(self.state_file)
        return self._state

    def merge_state(self, other: dict[str, Any]) -> None:
        """Add records from another copy of the state (e.g. Tune's callback state); nothing is dropped."""
        st = self.state
        for rung, recs in (other.get("rungs") or {}).items():
            for tid, rec in recs.items():
                st["rungs"].setdefault(rung, {}).setdefault(tid, rec)
        for key in ("stopped", "finished"):
            for tid, rec in (other.get(key) or {}).items():
                st[key].setdefault(tid, rec)

    def _write(self) -> None:
        if self.state_file:
            write_record(self.state_file, self.state)

    @property
    def stopped(self) -> dict[str, dict[str, Any]]:
        """Trials this scheduler cut short, with the decision (rung, position, reason)."""
        return self.state["stopped"]

    @property
    def finished(self) -> dict[str, dict[str, Any]]:
        """Final metrics of every trial that completed."""
        return self.state["finished"]

    def violation(self, result: dict[str, Any]) -> float:
        return limit_violation(result, self.limits)

    # -- the trials' order (repeatable decisions)
    def set_order(self, trial_ids: list[str]) -> None:
        """The trials in the order the searcher proposed them (written with the record)."""
        if list(trial_ids) != self.state.get("order"):
            self.state["order"] = list(trial_ids)
            self._write()

    def _resolved_at(self, trial_id: str, rung: int) -> bool:
        """Whether ``trial_id`` has a record at ``rung`` or ended before reaching it."""
        st = self.state
        if trial_id in st["rungs"].get(str(rung), {}):
            return True
        stop = st["stopped"].get(trial_id)
        return bool(stop and (stop.get("reason") != "rung" or int(stop.get("rung", 0)) < rung)) or \
            trial_id in st.get("errored", {})

    def _earlier(self, trial_id: str) -> list[str] | None:
        """The trials proposed before ``trial_id``, or None where its place is unknown."""
        order = self.state.get("order") or []
        return order[:order.index(trial_id)] if trial_id in order else None

    def _judge(self, trial_id: str, m: int) -> str:
        """The decision at rung ``m`` (recorded when it is STOP): ``trial_id`` ranked among the records there of the
        trials it may be compared with (repeatable: those proposed before it; else every one so far)."""
        st = self.state
        rung = st["rungs"][str(m)]
        earlier = self._earlier(trial_id) if self.repeatable else None
        if earlier is None:
            pool = dict(rung)
        else:  # in the trials' order, so that ties fall the same way whatever order the results came in
            pool = {t: rung[t] for t in [*earlier, trial_id] if t in rung}
        order = rank_records(pool, [d for _, d in self.objectives], ordered=earlier is not None)
        if pool[trial_id]["violation"] <= 0:  # within the budget: competes with the others within it
            order = [t for t in order if pool[t]["violation"] <= 0]
        position, keep = order.index(trial_id), keeps(len(order), self.reduction_factor)
        if position < keep:
            return TrialScheduler.CONTINUE
        st["stopped"][trial_id] = {"reason": "rung", "rung": m, M.EPOCH: pool[trial_id].get(M.EPOCH, m),
                                   "position": position + 1, "of": len(order), "kept": keep,
                                   "result": pool[trial_id].get("result")}
        return TrialScheduler.STOP

    def _decidable(self, trial_id: str, m: int) -> bool:
        earlier = self._earlier(trial_id)
        return earlier is None or all(self._resolved_at(t, m) for t in earlier)

    # -- decisions
    def decide(self, trial_id: str, result: dict[str, Any]) -> str:
        """Record the trial at every rung it has reached and return CONTINUE, STOP or (repeatable, its decision
        waiting on earlier trials) PAUSE; the state is written first."""
        st = self.state
        if trial_id in st["stopped"]:
            return TrialScheduler.STOP
        if self.repeatable and trial_id in st.get("waiting", {}):
            # Its decision waits on earlier trials; a result that arrives before the pause takes effect changes
            # nothing (the trials table reads no further than a stop's epoch).
            return TrialScheduler.PAUSE
        if result.get(M.DIVERGED):
            st["stopped"][trial_id] = {"reason": "diverged", M.EPOCH: int(result.get(M.EPOCH) or 0),
                                       "error": str(result.get(M.ERROR, ""))[:500]}
            self._write()
            return TrialScheduler.STOP
        epoch = int(result.get(M.EPOCH, 0))
        changed = False
        action = TrialScheduler.CONTINUE
        for m in self.milestones:
            rung = st["rungs"].setdefault(str(m), {})
            if epoch < m or trial_id in rung:
                continue
            rung[trial_id] = {"values": [_num(result.get(k)) for k, _ in self.objectives],
                              "violation": self.violation(result), M.EPOCH: epoch,
                              # the result judged: the trials table's, should Tune's copy die in a kill
                              "result": {k: result[k] for k in M.EPOCH_METRICS if k in result}}
            changed = True
            if self.repeatable and not self._decidable(trial_id, m):
                st.setdefault("waiting", {})[trial_id] = m  # decided when the trials before it reach the rung
                action = TrialScheduler.PAUSE
                break
            action = self._judge(trial_id, m)
            if action == TrialScheduler.STOP:
                break
        if changed:
            self._write()  # before Tune acts on the decision
        return action

    # -- Tune hooks
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        """A trial Tune added: a new one, or one it restored. A restored trial carries no decision Tune cached in the
        session before (a STOP cached while its last save was in flight would end its retry at the first checkpoint:
        ``base.internals``)."""
        forget_cached_decision(tune_controller, trial.trial_id)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self.decide(trial.trial_id, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        tid = trial.trial_id
        if result and tid not in self.stopped and not result.get(M.DIVERGED) and M.EPOCH in result:
            self.finished.setdefault(tid, {k: result[k] for k in M.EPOCH_METRICS if k in result})
            self._write()

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        """A trial that failed. Tune calls this both when it retries the trial from its last checkpoint (a worker or
        a node lost, within ``max_failures``: nothing is recorded, the trial goes on) and when it has no retry left:
        then it is recorded, so that it counts as errored even where Tune's experiment state still lists it as
        running and a resume never trains it again. One that failed for a full disk stops the search here, before
        anything records it: the resume trains it again."""
        stop_if_disk_full(trial)
        if trial.should_recover():  # Tune requeues it: it is still one of the search's live trials
            return
        self.state.setdefault("errored", {})[trial.trial_id] = {M.EPOCH: int((trial.last_result or {}).get(M.EPOCH, 0))}
        self._write()

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        # After a restore Tune may still list as unfinished a trial this scheduler had stopped, seen finish or
        # seen fail (a kill between our write and Tune's own checkpoint): stop it, do not train it.
        done = {**self.stopped, **self.finished, **self.state.get("errored", {})}
        for trial in tune_controller.get_trials():
            if trial.status in (Trial.PENDING, Trial.PAUSED) and trial.trial_id in done:
                tune_controller.stop_trial(trial)
        if not self.repeatable:
            return super().choose_trial_to_run(tune_controller)
        return self._next_repeatable(tune_controller)

    def _next_repeatable(self, tune_controller) -> Trial | None:
        """Decide the waiting trials whose earlier trials have all reached their rung (a stop is carried out), then
        run the earliest trial that may go on: a decided paused one, else the first pending one."""
        waiting = self.state.setdefault("waiting", {})
        trials = tune_controller.get_trials()
        for trial in trials:
            m = waiting.get(trial.trial_id)
            if m is None or not self._decidable(trial.trial_id, m):
                continue
            del waiting[trial.trial_id]
            action = self._judge(trial.trial_id, m)
            self._write()
            if action == TrialScheduler.STOP and trial.status in (Trial.PENDING, Trial.PAUSED):
                tune_controller.stop_trial(trial)
        for status in (Trial.PAUSED, Trial.PENDING):
            for trial in trials:
                if trial.status == status and trial.trial_id not in waiting and trial.trial_id not in self.stopped:
                    return trial
        return None

    def debug_string(self) -> str:
        st = self.state
        rungs = ", ".join(f"{m}: {len(st['rungs'].get(str(m), {}))}" for m in self.milestones)
        return f"RungScheduler: rungs at epochs {self.milestones} (records {rungs}); {len(st['stopped'])} stopped"


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class ConfirmScheduler(FIFOScheduler):
    """The confirmation's runs in order, as Tune's FIFO runs them; a run that failed for want of disk space stops the
    confirmation (and the search) in one line, as in the search's trials, before the failure is recorded."""

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        stop_if_disk_full(trial)
        super().on_trial_error(tune_controller, trial)


def stop_if_disk_full(trial: Trial) -> None:
    """Raise DiskFull where ``trial`` failed for want of disk space (its error, as Tune wrote it, says so; or Tune
    could not even write it): the search stops before the failure is recorded anywhere."""
    path = trial.error_file
    try:
        text = open(path, encoding="utf-8", errors="replace").read() if path else ""
    except OSError as e:
        if full_disk(e) is not None:
            raise DiskFull(28, "No space left on device", path) from e
        return
    found = full_disk(RuntimeError(text)) if text else None
    if found is not None:
        raise DiskFull(28, "No space left on device", found.filename)
