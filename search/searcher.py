"""The Optuna side of a search: a Tune ``Searcher`` of our own on Optuna's public ask/tell interface.

- The study lives in Optuna's own journal storage in the run folder (``akdtune/study.journal``),
  written as trials report. It is the single record of the study: a resumed search loads it, the
  results/ code reads it, and another process can watch it (``optuna.load_study``, or
  ``optuna-dashboard``) while the search runs. Each Optuna trial that Tune runs carries its Ray
  trial id as the user attribute ``ray_trial_id``.
- A trial the scheduler cut short is told as PRUNED, with its intermediate values (single-objective
  studies); one that diverged or errored is FAIL, with the reason as user attribute ``error``; a
  completed one is COMPLETE with its objective values. (Ray's stock OptunaSearch tells Optuna that
  an ASHA-stopped trial COMPLETEd with its early, low-fidelity score.)
- A space's budget is told to the sampler as constraints (``param_ratio - budget <= 0``, via
  ``Trial.set_constraint``) as soon as a setting's size is known, so TPE spends trials where the
  answer lies.
- A setting over the space's limits (``limits: {param_ratio, flops}``) is refused before it is trained:
  ``search.budget.BudgetCheck`` works out its size and FLOPs on the meta device when Optuna proposes
  it. It is told PRUNED before its first step, with its constraint values (TPE ranks it infeasible
  and learns where the budget ends) and the user attribute ``over_budget`` (why, in words); then
  Optuna is asked again. So every trial Tune runs is within the budget, and only trials Tune runs
  carry a ``ray_trial_id``.
- TPE is used for one and for two objectives (it learns from pruned and infeasible trials;
  NSGA-II ignores pruned ones).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search import Searcher

from base import metrics as M
from base.internals import running_trial
from base.layout import SCHEDULER_FILE, STUDY_FILE
from results.checks import running_but_finished
from results.journal import RAY_ID, journal_storage, newest_by_ray_id, open_study
from results.limits import ATTEMPT, OVER_BUDGET, PROPOSAL  # a refused setting's proposal and try
from results.moves import here
from results.schedule_record import scheduler_record
from search.budget import MAX_REFUSALS
from search.space import DefineByRun, Param

log = logging.getLogger(__name__)
CONSTRAINT = "param_budget"
INDEX = "index"  # repeatable: a trial's place in the order of proposals (0, 1, ...)


class OptunaSearcher(Searcher):
    """Suggests configurations with Optuna (TPE) and tells it how each trial ended.

    Args:
        params: the space's parameters (define-by-run, so conditional parameters work).
        objectives: ``[(metric, "max"|"min"), ...]``.
        seed: sampler seed.
        num_samples: trials in the search (sets TPE's random start-up trials).
        study_path: journal file of the study; None keeps it in memory.
        study_name: the study's name in that file.
        param_budget: shorthand for ``limits={"param_ratio": param_budget}``.
        limits: the space's budget {metric: upper limit}, told to TPE as constraints (feasible when <= 0):
            ``param_budget`` = param_ratio - limit, and ``<metric>_budget`` = value / limit - 1 for the others.
        scheduler: the search's ``RungScheduler``; its decisions say which trials were pruned.
        budget_check: a ``search.budget.BudgetCheck``; a proposed setting over the budget is refused before it
            is trained (told PRUNED before its first step, with the user attribute ``over_budget``) and another
            one asked for.
        repeatable: trial k's setting is proposed from the study as it stood when trials 0..k-c-1 had finished
            (c = ``concurrency``) and trials k-c..k-1 were running, by a sampler seeded with (seed, k): the same
            settings whatever order results arrive in (``suggest`` waits, returning None, until those trials
            have finished). The study itself is written as results arrive; each proposal reads a view of it.
        concurrency: trials run at once (repeatable proposals lag this many trials behind).
    """

    def __init__(self, params: Sequence[Param], objectives: Sequence[tuple[str, str]], seed: int, num_samples: int,
                 study_path: str | None, study_name: str, param_budget: float | None = None, scheduler=None,
                 limits: dict[str, float] | None = None, budget_check=None, repeatable: bool = False,
                 concurrency: int = 1):
        super().__init__(metric=objectives[0][0], mode=objectives[0][1])
        self.params = tuple(params)
        self.objectives = [(str(m), str(d)) for m, d in objectives]
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.study_path = study_path
        self.study_name = study_name
        self.limits = {**(limits or {}), **({M.PARAM_RATIO: float(param_budget)} if param_budget is not None else {})}
        self.scheduler = scheduler
        self.budget_check = budget_check
        self.repeatable = repeatable
        self.concurrency = max(1, int(concurrency))
        self.asked: list[str] = []  # Ray trial ids in the order they were proposed: trial k is asked[k]
        self._study = self._storage = None
        self._live: dict[str, Any] = {}  # ray trial id -> optuna.Trial of this process
        self._steps: dict[str, set[int]] = {}  # ray trial id -> epochs reported to Optuna

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_study"], d["_storage"], d["_live"], d["_steps"] = None, None, {}, {}  # the journal file is the record
        return d

    def __setstate__(self, d):
        if "limits" not in d:  # pickled by an earlier version: the budget was param_budget alone
            budget = d.pop("param_budget", None)
            d["limits"] = {M.PARAM_RATIO: float(budget)} if budget is not None else {}
        d.setdefault("budget_check", None)  # pickled before settings were checked against the budget
        d.setdefault("repeatable", False)  # pickled before searches were repeatable
        d.setdefault("concurrency", 1)
        d.setdefault("asked", [])
        self.__dict__.update(d)
        self.study_path = here(self.study_path)  # a copied or moved search writes into its new folder

    # -- the study
    @property
    def study(self):
        if self._study is None:

            # Repeatable: settings come from views of the study (see suggest); its own sampler picks nothing.
            sampler = optuna.samplers.RandomSampler(seed=self.seed) if self.repeatable else self._sampler(self.seed)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._storage = journal_storage(self.study_path)
            self._study = optuna.create_study(
                study_name=self.study_name, storage=self._storage, sampler=sampler, load_if_exists=True,
                directions=["maximize" if d == "max" else "minimize" for _, d in self.objectives])
        return self._study

    def _sampler(self, seed: int):
        n_startup = max(2, min(10, self.num_samples // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, constant_liar=True)

    def _trial(self, trial_id: str):
        """The running Optuna trial of a Ray trial (rebuilt from storage after a restore), or None."""
        if trial_id in self._live:
            return self._live[trial_id]

        for ft in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if ft.user_attrs.get(RAY_ID) == trial_id:
                self._live[trial_id] = running_trial(self.study, self._storage, ft.number)
                self._steps[trial_id] = set(ft.intermediate_values)
                return self._live[trial_id]
        return None

    # -- Tune hooks
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.repeatable:
            return self._suggest_in_order(trial_id)
        trial, setting, _ = self._propose(self.study, lambda attempt: None)
        trial.set_user_attr(RAY_ID, trial_id)
        self._live[trial_id], self._steps[trial_id] = trial, set()
        self._record_proposal(trial_id)
        return setting

    def _propose(self, study, on_refused) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
        """Ask ``study`` for settings until one is within the budget; each refused one is told PRUNED (with its
        constraint values and ``over_budget``) and passed to ``on_refused(attempt)``. (trial, its setting, its
        costs where the budget check knows them)."""
        check = self.budget_check if self.budget_check is not None and self.budget_check.active else None
        for attempt in range(MAX_REFUSALS + 1):
            trial = study.ask()
            fixed = DefineByRun(self.params)(trial)
            setting = {**trial.params, **fixed}
            costs = check.costs(setting) if check is not None else None
            if costs is not None:
                self._constrain(trial, costs)
            reason = check.reason(costs) if check is not None and attempt < MAX_REFUSALS else None
            if reason is None:
                break
            # Over the budget: never trained. Pruned before its first step, with its constraint values, so
            # that TPE learns where the budget ends; the next ask draws again.
            trial.set_user_attr(OVER_BUDGET, reason)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            on_refused(attempt)
        if attempt == MAX_REFUSALS:
            log.warning("%d settings in a row were over the budget; training the next one (it ranks after those "
                        "within the budget)", MAX_REFUSALS)
        return trial, setting, costs

    def _suggest_in_order(self, trial_id: str) -> dict[str, Any] | None:
        """Repeatable: trial k's setting from the view of the study at k (None until trials 0..k-c-1 finished)."""
        k = len(self.asked)
        view = self._view(k)
        if view is None:
            return None
        mirror = self.study

        def on_refused(attempt: int) -> None:  # the refused setting goes into the study too, in its place
            ft = view.trials[-1]
            mirror.add_trial(optuna.trial.create_trial(
                state=ft.state, params=ft.params, distributions=ft.distributions,
                user_attrs={**ft.user_attrs, PROPOSAL: k, ATTEMPT: attempt}, system_attrs=ft.system_attrs))

        chosen, setting, costs = self._propose(view, on_refused)
        self.study.enqueue_trial(chosen.params, user_attrs={INDEX: k})
        trial = self.study.ask()
        DefineByRun(self.params)(trial)  # the enqueued values, with their distributions
        if costs is not None:
            self._constrain(trial, costs)
        trial.set_user_attr(RAY_ID, trial_id)
        self._live[trial_id], self._steps[trial_id] = trial, set()
        self._record_proposal(trial_id)
        return setting

    def _record_proposal(self, trial_id: str) -> None:
        """``trial_id`` is the next trial in the order of proposals (recorded by the scheduler: the tables' ``trial``)."""
        self.asked.append(trial_id)
        if self.scheduler is not None:
            self.scheduler.set_order(self.asked)

    def _constrain(self, trial, values: dict[str, Any]) -> None:
        """Tell the sampler the budget's constraints for the metrics in ``values`` (feasible when <= 0), once per
        trial and metric: ``param_budget`` = param_ratio - limit, ``<metric>_budget`` = value / limit - 1."""
        for metric, limit in self.limits.items():
            told = M.PARAM_RATIO if metric == M.PARAM_RATIO else f"{metric}_budget_told"
            if values.get(metric) is None or trial.user_attrs.get(told) is not None:
                continue
            value = float(values[metric])
            trial.set_user_attr(told, value if metric == M.PARAM_RATIO else True)
            if metric == M.PARAM_RATIO:
                trial.set_constraint(CONSTRAINT, value - limit)
            else:
                trial.set_constraint(f"{metric}_budget", value / limit - 1.0)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self._trial(trial_id)
        if trial is None or M.EPOCH not in result:
            return
        epoch = int(result[M.EPOCH])
        self._constrain(trial, result)  # measured once per trial: told once (at suggest when the check knew it)
        value = result.get(self.objectives[0][0])
        if len(self.objectives) == 1 and value is not None and math.isfinite(value):
            if epoch not in self._steps.setdefault(trial_id, set()):
                trial.report(float(value), epoch)
                self._steps[trial_id].add(epoch)
        trial.set_user_attr("epochs", epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._trial(trial_id)
        if trial is None:  # already told (e.g. before a restore), or never asked
            return
        stopped = self.scheduler.stopped.get(trial_id) if self.scheduler is not None else None
        if not result or M.EPOCH not in result:
            result = (self.scheduler.finished.get(trial_id) if self.scheduler is not None else None) or result or {}
        state, values, attrs = study_outcome(self.objectives, result, stopped, error)
        try:
            if state == optuna.trial.TrialState.PRUNED:
                # Tune does not pass the result that made the scheduler stop a trial to on_trial_result:
                # record the value the rung judged, so the pruned trial keeps its intermediate values.
                self.on_trial_result(trial_id, stopped.get("result") or result)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            self.study.tell(trial, values, state=None if values is not None else state)
        except (RuntimeError, ValueError) as exc:  # told twice after a restore
            log.debug("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._live.pop(trial_id, None)
        self._steps.pop(trial_id, None)

    def _view(self, k: int):
        """The study as repeatable proposal ``k`` sees it (an in-memory copy): every setting refused for proposals
        0..k-1, trials 0..k-c-1 as they finished, trials k-c..k-1 running; None while one of trials 0..k-c-1 is
        still running."""
        TS = optuna.trial.TrialState
        mine = {t: i for i, t in enumerate(self.asked)}
        by_index, refused = {}, {}
        for ft in self.study.get_trials(deepcopy=False):
            if ft.user_attrs.get(RAY_ID) in mine:
                by_index[mine[ft.user_attrs[RAY_ID]]] = ft
            elif PROPOSAL in ft.user_attrs and ft.user_attrs[PROPOSAL] < k:  # a kill may repeat one: kept once
                refused.setdefault((ft.user_attrs[PROPOSAL], ft.user_attrs.get(ATTEMPT, 0)), ft)
        done = k - self.concurrency
        if any(j not in by_index or not by_index[j].state.is_finished() for j in range(max(0, done))):
            return None
        view = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for _, d in self.objectives],
                                   sampler=self._sampler(self.seed * 100_003 + k))
        system = lambda ft: {a: v for a, v in ft.system_attrs.items() if a != "fixed_params"}  # noqa: E731
        for j in range(k):
            for key in sorted(r for r in refused if r[0] == j):
                ft = refused[key]
                view.add_trial(optuna.trial.create_trial(state=ft.state, params=ft.params, distributions=ft.distributions,
                                                         user_attrs=ft.user_attrs, system_attrs=system(ft)))
            ft = by_index[j]
            finished = j < done
            last = ft.user_attrs.get("stopped_epoch") or math.inf  # a pruned trial: no further than its rung
            view.add_trial(optuna.trial.create_trial(
                state=ft.state if finished else TS.RUNNING, params=ft.params, distributions=ft.distributions,
                values=ft.values if finished and ft.state == TS.COMPLETE else None,
                intermediate_values={s: v for s, v in ft.intermediate_values.items() if s <= last} if finished else None,
                user_attrs=ft.user_attrs, system_attrs=system(ft)))
        return view

    def save(self, checkpoint_path: str) -> None:
        # Tune saves this with its experiment state: the trials proposed so far, in order (the study's record is
        # its journal file).

        with open(checkpoint_path, "w") as f:
            json.dump({"study": STUDY_FILE if self.study_path else None, "asked": self.asked}, f)

    def restore(self, checkpoint_path: str) -> None:
        self._study, self._live = None, {}
        try:
            with open(checkpoint_path) as f:
                self.asked = list(json.load(f).get("asked", self.asked))
        except (OSError, ValueError):
            pass  # a marker written before searches were repeatable
        if self.scheduler is not None:  # never shorter than the scheduler's record (see ``proposed``)
            self.scheduler.set_order(self.proposed())

    def proposed(self) -> list[str]:
        """The trials proposed so far, in order: the scheduler's record, written as each trial is proposed (and cut back
        by :meth:`agree_with` as a resume starts), so always the newest; this searcher's own list only where the record
        has none (a search started before it kept the order). Tune saves the searcher's list only now and then, and
        may restore one from an earlier session: after a resume that proposed ``d`` in place of a lost ``c`` and was
        killed in turn, that list still says ``c`` where the record says ``d``, and trusting it proposed the same
        place again while Tune ran ``d``: one proposal trained twice."""
        order = list(self.scheduler.state.get("order") or []) if self.scheduler is not None else []
        return order or list(self.asked)

    def agree_with(self, known: list[str]) -> None:
        """After a restore: the trials proposed are those Tune restored (``known``), in the order they were proposed:
        a proposal made after Tune last saved its trials is made again (repeatable: the same setting), one Tune has is
        never made twice."""
        order, have, k = self.proposed(), set(known), 0
        while k < len(order) and order[k] in have:
            k += 1
        self.asked = order[:k]
        if self.scheduler is not None:
            self.scheduler.set_order(self.asked)


def fail_abandoned(study_path: str, known_trial_ids: set[str]) -> int:
    """Tell FAIL (reason ``abandoned``) for every Optuna trial still RUNNING whose Ray trial Tune never
    recorded (asked just before the driver was killed; the resumed search asked another in its place).
    Returns how many."""
    study = open_study(study_path)
    if study is None:
        return 0
    n = 0
    for ft in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if ft.user_attrs.get(RAY_ID) not in known_trial_ids:
            study.tell(ft.number, state=optuna.trial.TrialState.FAIL)
            n += 1
    return n


RETRY_OF = "retry_of"  # a trial a resume trains again after it errored: the number of its FAIL record in the study


def reopen_for_retry(study_path: str, trial_ids: list[str], params: Sequence[Param]) -> int:
    """Errored trials a resume trains again (``search.scheduler.retry_errored``): each whose newest record in the
    study is FAIL gets a new RUNNING record with the same setting, user attributes and intermediate values (and
    ``retry_of``), so that the study ends with the retry's own outcome as the trials table does. A finished record
    of the study cannot change: the FAIL one stays as the history of the failed attempt. Returns how many."""
    study = open_study(study_path)
    if study is None or not trial_ids:
        return 0
    newest = newest_by_ray_id(study)
    n = 0
    for ray_id in trial_ids:
        ft = newest.get(ray_id)
        if ft is None or ft.state != optuna.trial.TrialState.FAIL:
            continue
        told = {M.PARAM_RATIO, *(k for k in ft.user_attrs if k.endswith("_budget_told"))}  # told again by the retry
        study.enqueue_trial(ft.params, user_attrs={**{k: v for k, v in ft.user_attrs.items()
                                                      if k != "error" and k not in told}, RETRY_OF: ft.number})
        trial = study.ask()
        DefineByRun(params)(trial)  # the enqueued values, with their distributions
        for step, value in sorted(ft.intermediate_values.items()):
            trial.report(value, step)
        n += 1
    return n


def study_outcome(objectives: Sequence[tuple[str, str]], result: dict[str, Any] | None, stopped: dict[str, Any] | None,
                  error: bool = False) -> tuple[optuna.trial.TrialState, list[float] | None, dict[str, Any]]:
    """How a trial that ended is told to the study, wherever it is told (as it ends, or again at a resume): FAIL where
    it errored, diverged or ended without a finite value of every objective; PRUNED where the scheduler stopped it;
    else COMPLETE with the objectives' values. (state, values or None, the user attributes that say why)."""
    TS, result = optuna.trial.TrialState, result or {}
    if error or result.get(M.DIVERGED) or (stopped and stopped.get("reason") == "diverged"):
        reason = "error" if error else str(result.get(M.ERROR) or (stopped or {}).get("error") or "diverged")
        return TS.FAIL, None, {"error": reason[:500]}
    if stopped:
        return TS.PRUNED, None, {"stopped_at_rung": stopped.get("rung"), "stopped_epoch": stopped.get(M.EPOCH)}
    values = [result.get(m) for m, _ in objectives]
    if all(v is not None and math.isfinite(float(v)) for v in values):
        return TS.COMPLETE, [float(v) for v in values], {}
    return TS.FAIL, None, {"error": "finished without a result"}


def mend_study(folder: str, objectives: Sequence[tuple[str, str]]) -> list[str]:
    """Tell the study how each trial ended that the scheduler recorded as finished or stopped but the study still has
    running (``results.checks.running_but_finished``: a kill between the two records, or a study journal whose
    end ``--repair`` dropped), as the searcher tells it when a trial ends: never lose a finished trial's result.
    Returns their Ray ids."""
    running = running_but_finished(folder)
    if not running:
        return []
    study, scheduler = open_study(f"{folder}/{STUDY_FILE}"), scheduler_record(f"{folder}/{SCHEDULER_FILE}")
    newest = newest_by_ray_id(study)
    for tid in running:
        state, values, _ = study_outcome(objectives, scheduler["finished"].get(tid), scheduler["stopped"].get(tid))
        study.tell(newest[tid].number, values, state=None if values is not None else state)
    return running
