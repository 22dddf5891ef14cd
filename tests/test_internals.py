"""Every reliance on Ray Tune's internals (``base.internals``), each checked against the installed Ray: where an
upgrade changes one, its test fails in one line naming it. And what the search does with them."""
import inspect
from types import SimpleNamespace

from base import internals


def test_tune_saves_and_restores_its_cached_decisions_with_the_experiment_state():
    """The assumption behind ``forget_cached_decision``: the controller keeps cached decisions in a dict attribute
    that its saved state (``__getstate__``) carries and a restore (``__setstate__``) puts back."""
    from ray.tune.execution.tune_controller import TuneController

    init, getstate = inspect.getsource(TuneController.__init__), inspect.getsource(TuneController.__getstate__)
    assert f"self.{internals.CACHED_DECISIONS} = {{}}" in init, \
        f"Ray changed TuneController: no {internals.CACHED_DECISIONS} dict (base.internals: cached decisions)"
    assert internals.CACHED_DECISIONS not in getstate, \
        f"Ray changed TuneController: its saved state leaves out {internals.CACHED_DECISIONS} (base.internals " \
        "may no longer be needed)"


def test_a_schedulers_hooks_get_the_controller_behind_the_wrapper():
    from ray.tune.execution.tune_controller import TrialRunnerWrapper

    assert f"self.{internals.WRAPPED_CONTROLLER} = tune_controller" in inspect.getsource(TrialRunnerWrapper.__init__), \
        f"Ray changed TrialRunnerWrapper: no {internals.WRAPPED_CONTROLLER} (base.internals: cached decisions)"


def test_a_restored_trial_forgets_the_decision_cached_before_the_kill():
    from ray.tune.execution.tune_controller import TrialRunnerWrapper

    controller = SimpleNamespace(**{internals.CACHED_DECISIONS: {"a": "STOP", "b": "PAUSE"}})
    wrapped = TrialRunnerWrapper(controller, trial_executor=SimpleNamespace())
    assert internals.forget_cached_decision(wrapped, "a") == "STOP"
    assert internals.forget_cached_decision(wrapped, "a") is None
    assert getattr(controller, internals.CACHED_DECISIONS) == {"b": "PAUSE"}
    assert internals.forget_cached_decision(SimpleNamespace(), "b") is None  # a controller without the dict


def test_the_rung_scheduler_forgets_a_cached_decision_when_tune_adds_a_restored_trial():
    from ray.tune.execution.tune_controller import TrialRunnerWrapper

    from search.scheduler import RungScheduler

    controller = SimpleNamespace(**{internals.CACHED_DECISIONS: {"t1": "STOP"}})
    scheduler = RungScheduler([("val_acc", "max")], max_epochs=4, grace_period=1, reduction_factor=2)
    scheduler.on_trial_add(TrialRunnerWrapper(controller, trial_executor=SimpleNamespace()),
                           SimpleNamespace(trial_id="t1", evaluated_params={}, config={}))
    assert getattr(controller, internals.CACHED_DECISIONS) == {}


def test_an_errored_trial_that_a_resume_retries_is_running_again_in_the_study(tmp_path):
    import optuna

    from results.journal import journal_storage, open_study
    from results.study import newest_records
    from search.searcher import RAY_ID, RETRY_OF, reopen_for_retry
    from search.space import Param

    params = [Param("lr_student", "float", low=0.01, high=0.1, log=True)]
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="akdtune", storage=journal_storage(str(path)), direction="maximize")
    t = study.ask()
    t.suggest_float("lr_student", 0.01, 0.1, log=True)
    t.set_user_attr(RAY_ID, "abc")
    t.set_user_attr("index", 0)
    t.report(0.3, 1)
    t.set_user_attr("error", "error")
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    assert reopen_for_retry(str(path), ["abc"], params) == 1
    assert reopen_for_retry(str(path), ["abc"], params) == 0  # its newest record is running: nothing to do
    again = open_study(path)
    old, new = sorted(again.get_trials(deepcopy=False), key=lambda t: t.number)
    assert new.state == optuna.trial.TrialState.RUNNING and new.params == old.params
    assert new.user_attrs[RAY_ID] == "abc" and new.user_attrs[RETRY_OF] == old.number and "error" not in new.user_attrs
    assert new.intermediate_values == {1: 0.3} and new.distributions == old.distributions
    assert [t.number for t in newest_records(again)] == [new.number]


def test_a_search_generators_and_a_concurrency_limiters_state_have_the_keys_the_search_sets():
    from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

    class Nothing(Searcher):
        def suggest(self, trial_id):
            return None

    state = SearchGenerator(Nothing()).get_state()
    for key in (internals.GENERATOR_COUNTER, internals.GENERATOR_FINISHED, "experiment"):
        assert key in state, f"Ray changed SearchGenerator.get_state(): no {key!r} (base.internals: a restored " \
                             "generator agrees with Tune's trials)"
    limiter = ConcurrencyLimiter(Nothing(), max_concurrent=2).get_state()
    for key in (internals.LIMITER_LIVE, internals.LIMITER_UNFINISHED):
        assert key in limiter, f"Ray changed ConcurrencyLimiter.get_state(): no {key!r} (base.internals)"
    assert internals.limiter_running(limiter, {"a"})[internals.LIMITER_UNFINISHED] == 1
    assert internals.generator_made(state, 7)[internals.GENERATOR_COUNTER] == 7


def test_a_storage_context_has_the_fields_a_copied_search_is_repointed_by(tmp_path):
    from ray.train._internal.storage import StorageContext

    ctx = StorageContext(storage_path=str(tmp_path / "old"), experiment_dir_name="s")
    for field in internals.STORAGE_FIELDS:
        assert hasattr(ctx, field), f"Ray changed StorageContext: no {field!r} (base.internals: a copied search's " \
                                    "generator is re-pointed)"
    internals.repoint_generator({"experiment": SimpleNamespace(storage=ctx)}, str(tmp_path / "new" / "t"))
    assert ctx.experiment_fs_path.rstrip("/").endswith("new/t")


def test_an_optuna_trial_is_reached_from_its_storage_id(tmp_path):
    import optuna

    from results.journal import journal_storage

    storage = journal_storage(str(tmp_path / "j"))
    study = optuna.create_study(study_name="s", storage=storage)
    asked = study.ask()
    trial = internals.running_trial(study, storage, asked.number)
    assert isinstance(trial, optuna.trial.Trial), "Optuna changed optuna.trial.Trial(study, trial_id) (base.internals)"
    trial.report(0.5, 1)
    study.tell(trial, 0.7)
    assert study.trials[0].value == 0.7 and study.trials[0].intermediate_values == {1: 0.5}


def test_tunes_file_names_are_the_ones_the_run_folder_names():
    """``base.internals`` names Tune's files once (``base.layout`` beside the project's own); each name is pinned here
    against the installed Ray."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl.tuner_internal import _TUNER_PKL
    from ray.tune.result import EXPR_ERROR_FILE, EXPR_PARAM_FILE, EXPR_RESULT_FILE
    from ray.tune.search import Searcher, SearchGenerator

    pinned = {"tuner.pkl": (_TUNER_PKL, internals.TUNER_FILE),
              "experiment state": (TuneController.CKPT_FILE_TMPL.format("*"), internals.EXPERIMENT_STATE),
              "search generator state": (SearchGenerator.CKPT_FILE_TMPL.format("*"), internals.TUNE_STATE[1]),
              "searcher state": (Searcher.CKPT_FILE_TMPL.format("*"), internals.SEARCHER_STATE),
              "callback state": (CallbackList.CKPT_FILE_TMPL.format("*"), internals.TUNE_STATE[3]),
              "checkpoint folder": (StorageContext._make_checkpoint_dir_name(0)[:-6], internals.CHECKPOINT_PREFIX),
              "trial's settings": (EXPR_PARAM_FILE, internals.TRIAL_PARAMS), "trial's results": (EXPR_RESULT_FILE, internals.TUNE_RESULTS),
              "trial's error": (EXPR_ERROR_FILE, internals.TRIAL_ERROR)}
    for what, (tunes, ours) in pinned.items():
        assert tunes == ours, f"Ray changed the name of its {what}: {tunes!r}, where base.internals says {ours!r}"
