"""Search spaces: every shipped space validates; malformed ones give exit 2 and one line naming the key."""

import pytest
import yaml

from conftest import ROOT, run_main
from search.space import DefineByRun, SpaceError, load_space, parse_space
from trainable.config import build_config

SPACES = sorted((ROOT / "spaces").glob("*.yaml"))
VALID = {"budget": {"num_samples": 2, "max_epochs": 3, "grace_period": 1},
         "params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}


def test_the_promised_spaces_ship():
    assert {p.stem for p in SPACES} >= {"capacity", "lr", "loss", "ratios", "cifar100_dfad", "methods", "flops",
                                        "imagenet_r50_mbv2", "tinyimagenet_avkd"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_validates_on_its_task_and_on_digits(path):
    space = load_space(path)
    assert space.params and space.num_samples >= 1
    assert load_space(path, task_override="digits").task == "digits"


def test_capacity_space_is_two_objective_with_a_budget():
    s = load_space(ROOT / "spaces" / "capacity.yaml")
    assert s.multi_objective and s.param_budget == 0.10
    p = {q.name: q for q in s.params}["student_fraction"]
    assert p.low < s.param_budget < p.high  # reaches past the budget: those sizes are refused before training
    assert s.confirm_top_k >= 1 and s.confirm_seeds >= 2  # the winner is confirmed over seeds


def test_define_by_run_respects_conditions():
    import optuna

    s = parse_space({**VALID, "params": {
        "student_loss": {"type": "categorical", "choices": ["l1", "kl"]},
        "temperature": {"type": "float", "low": 1, "high": 8, "when": {"student_loss": "kl"}},
        "n_student": {"type": "int", "low": 1, "high": 10},
        "generator": {"type": "fixed", "value": "deconv"}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        t = study.ask()
        fixed = DefineByRun(s.params)(t)
        params = {**t.params, **fixed}
        assert ("temperature" in params) == (params["student_loss"] == "kl")
        assert params["generator"] == "deconv" and 1 <= params["n_student"] <= 10
        build_config(params)
        seen.add(params["student_loss"])
        study.tell(t, 0.5)
    assert seen == {"l1", "kl"}


MALFORMED = [
    ({**VALID, "params": {"lr_studnet": {"type": "float", "low": 0.1, "high": 1}}}, "params.lr_studnet: unknown hyperparameter"),
    ({**VALID, "params": {"lr_student": {"type": "float", "low": 0.5, "high": 0.1}}}, "params.lr_student: low (0.5) must be < high (0.1)"),
    ({**VALID, "params": {"lr_student": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "params.lr_student: log scale needs low > 0"),
    ({**VALID, "params": {"student_loss": {"type": "categorical", "choices": []}}}, "params.student_loss.choices: expected a non-empty list"),
    ({**VALID, "params": {"student_loss": {"type": "categorical", "choices": ["l1", "huber"]}}}, "params.student_loss: value 'huber' is invalid"),
    ({**VALID, "params": {"lr_student": {"type": "float", "low": "a", "high": 0.1}}}, "params.lr_student.low: expected a number"),
    ({**VALID, "params": {"lr_student": {"type": "gaussian"}}}, "params.lr_student.type: expected one of"),
    ({**VALID, "params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.1, "scale": 2}}}, "params.lr_student.scale: unknown key"),
    ({**VALID, "params": {"n_student": {"type": "int", "low": 0, "high": 5}}}, "params.n_student: value 0 is invalid"),
    ({**VALID, "params": {"student_fraction": {"type": "float", "low": 0.1, "high": 1.5}}}, "params.student_fraction: value 1.5 is invalid"),
    ({**VALID, "task": "imagenet"}, "task: unknown 'imagenet'"),
    ({**VALID, "budget": {"num_samples": 0}}, "budget.num_samples: expected an integer >= 1"),
    ({**VALID, "budget": {"max_epochs": 3, "grace_period": 5}}, "budget.grace_period: (5) must be <= budget.max_epochs (3)"),
    ({**VALID, "budget": {"reduction_factor": 1}}, "budget.reduction_factor: expected a number > 1"),
    ({**VALID, "objectives": [{"metric": "val_acc", "mode": "up"}]}, "objectives[0].mode: expected max or min"),
    ({**VALID, "objectives": [{"metric": "accuracy", "mode": "max"}]}, "objectives[0].metric: unknown 'accuracy'"),
    ({**VALID, "param_budget": 2}, "param_budget: expected a parameter ratio in (0, 1]"),
    ({**VALID, "searchspace": {}}, "searchspace: unknown top-level key"),
    ({**VALID, "params": {"epochs": {"type": "int", "low": 1, "high": 5}}}, "params.epochs: cannot be searched"),
    ({**VALID, "fixed": {"momentum": -1}}, "fixed: momentum: must be >= 0"),
    ({**VALID, "params": {"temperature": {"type": "float", "low": 1, "high": 4, "when": {"student_loss": "kl"}}}},
     "params.temperature.when: 'student_loss' must be a categorical parameter listed before it"),
    ({"budget": {"num_samples": 2}}, "params: expected a non-empty mapping"),
]


@pytest.mark.parametrize("raw, needle", MALFORMED, ids=[m[1].split(":")[0] for m in MALFORMED])
def test_malformed_space_is_named(raw, needle):
    with pytest.raises(SpaceError) as e:
        parse_space(raw, "bad.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw, needle", MALFORMED[:12], ids=[m[1].split(":")[0] for m in MALFORMED[:12]])
def test_malformed_space_cli_exit_2_one_line(tmp_path, raw, needle):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    r = run_main("search/run_search.py", "--space", tmp_path / "bad.yaml", "--storage", tmp_path / "runs")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_unreadable_and_missing_spaces(tmp_path):
    (tmp_path / "broken.yaml").write_text("params: {lr_student: {type: float, low: 0.1\n")
    with pytest.raises(SpaceError, match="not valid YAML at line"):
        load_space(tmp_path / "broken.yaml")
    with pytest.raises(SpaceError, match="space file not found"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "exec.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SpaceError, match="not valid YAML"):  # safe_load refuses executable tags
        load_space(tmp_path / "exec.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="expected a YAML mapping"):
        load_space(tmp_path / "list.yaml")


def test_every_problem_reported_together():
    with pytest.raises(SpaceError) as e:
        parse_space({"budget": {"num_samples": -1}, "params": {"lr_studnet": {}, "n_student": {"type": "int", "low": 3, "high": 1}}})
    msg = str(e.value)
    assert "budget.num_samples" in msg and "lr_studnet" in msg and "n_student" in msg


def test_a_flops_budget_is_a_limit_like_the_parameter_budget():
    from base import metrics as M
    from results.limits import space_limits as budget_limits
    from results.limits import within_limits
    from search.space import limit_violation

    raw = {**VALID, "param_budget": 0.1, "budget": {**VALID["budget"], "flops": 1000}}
    space = parse_space(raw, "f.yaml")
    assert space.limits == budget_limits(raw) == {M.PARAM_RATIO: 0.1, M.FLOPS: 1000.0}
    assert within_limits({M.PARAM_RATIO: 0.05, M.FLOPS: 900}, space.limits)
    assert not within_limits({M.PARAM_RATIO: 0.05, M.FLOPS: 1100}, space.limits)
    assert limit_violation({M.PARAM_RATIO: 0.15, M.FLOPS: 1500}, space.limits) == pytest.approx(0.05 + 0.5)
    with pytest.raises(SpaceError, match="budget.flops: expected a positive number"):
        parse_space({**VALID, "budget": {**VALID["budget"], "flops": -1}}, "f.yaml")


NEW = {"search": {"num_samples": 2, "max_epochs": 3, "grace_period": 1}, "limits": {"param_ratio": 0.1, "flops": 1000},
       "params": VALID["params"]}


def test_search_settings_and_student_limits_have_their_own_keys_and_older_spaces_still_read():
    from base import metrics as M
    from results.limits import space_limits

    new = parse_space(NEW, "new.yaml")
    old = parse_space({**VALID, "param_budget": 0.1, "budget": {**VALID["budget"], "flops": 1000}}, "old.yaml")
    for s in (new, old):
        assert s.limits == {M.PARAM_RATIO: 0.1, M.FLOPS: 1000.0} and (s.num_samples, s.max_epochs) == (2, 3)
    assert space_limits(NEW) == space_limits(old.raw) == new.limits
    assert new.notes == () and "older keys ['budget', 'param_budget']" in old.notes[0]
    assert all(not {"budget", "param_budget"} & set(yaml.safe_load(p.read_text())) for p in SPACES)  # shipped: new


@pytest.mark.parametrize("raw, needle", [
    ({**NEW, "budget": {"num_samples": 2}}, "search: give either search (the older name: budget) or budget, not both"),
    ({**NEW, "param_budget": 0.1}, "limits: give the limits either in limits or in the older param_budget"),
    ({**NEW, "limits": {"params": 0.1}}, "limits.params: unknown key; valid: ['flops', 'param_ratio']"),
    ({**NEW, "limits": {"param_ratio": 2}}, "limits.param_ratio: expected a parameter ratio in (0, 1]"),
    ({**NEW, "limits": {"flops": 0}}, "limits.flops: expected a positive number"),
    ({**NEW, "search": {"flops": 10}}, "search.flops: unknown key"),
    ({**NEW, "search": {"confirm_seeds": 21}}, "search.confirm_seeds: expected an integer in [1, 20]"),
])
def test_bad_search_settings_and_limits_name_their_key(raw, needle):
    import re

    with pytest.raises(SpaceError, match=re.escape(needle)):
        parse_space(raw, "s.yaml")


def test_the_space_notes_its_older_keys_when_a_search_starts(tmp_path):
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**VALID, "param_budget": 0.1}))
    r = run_main("search/run_search.py", "--space", tmp_path / "old.yaml", "--storage", tmp_path / "runs", "--smoke",
                 "--gpus-per-trial", "9")  # refused before anything starts, after the note
    assert "note: " in r.stdout and "older keys ['budget', 'param_budget']" in r.stdout and r.returncode == 2


MODULE = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("ran")  # import-time code
import torch.nn as nn
def Net(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


@pytest.mark.parametrize("section", [
    {"fixed": {"student": "spacecode:Net"}},
    {"fixed": {"teacher": "spacecode:Net"}},
    {"params": {"student": {"type": "categorical", "choices": ["cnn", "spacecode:Net"]},
                "lr_student": {"type": "float", "low": 0.01, "high": 0.2}}},
    {"params": {"student": {"type": "fixed", "value": "spacecode:Net"}}},
], ids=["fixed student", "fixed teacher", "a student choice", "a fixed param"])
def test_a_space_that_names_code_imports_nothing_unless_trusted(tmp_path, monkeypatch, section):
    """A space file is data: a module it names is imported only with --trust-space (or, for the teacher, the same
    spec on the command line); refused in one line before any import otherwise."""
    import sys

    monkeypatch.chdir(tmp_path)  # the module sits in the folder the command runs from, which is importable
    monkeypatch.delitem(sys.modules, "spacecode", raising=False)
    (tmp_path / "spacecode.py").write_text(MODULE)
    raw = {"search": {"num_samples": 2, "max_epochs": 3, "grace_period": 1},
           "params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.2}}, **section}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match="names code to import .'spacecode:Net'.*add --trust-space") as e:
        load_space(path)
    assert "\n" not in str(e.value) and not (tmp_path / "imported").exists() and "spacecode" not in sys.modules
    r = run_main("search/run_search.py", "--space", path, "--storage", tmp_path / "runs")
    assert r.returncode == 2 and "names code to import" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "imported").exists() and not (tmp_path / "runs").exists()
    if "teacher" in str(section):
        load_space(path, trusted_specs=frozenset({"spacecode:Net"}))  # named on the command line too
    else:
        load_space(path, trust_code=True)
    assert (tmp_path / "imported").exists()  # trusted: imported like any module the user names


def test_the_zen_of_python_is_not_printed_by_a_space(tmp_path, capfd):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "fixed": {"student": "this:nosuch"}}))
    with pytest.raises(SpaceError, match="names code to import"):
        load_space(path)
    assert "Beautiful is better than ugly" not in capfd.readouterr().out
