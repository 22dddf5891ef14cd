"""Config validation: every problem reported together, by key."""
import pytest

from base.errors import ConfigError
from trainable.config import FIELDS, build_config, parse_value
from trainable.tasks import TASKS


def test_task_defaults_apply_under_overrides():
    cfg = build_config({"task": "cifar100", "lr_student": 0.05})
    assert cfg.teacher == "resnet34" and cfg.student == "resnet18" and cfg.epochs == 500
    assert cfg.lr_student == 0.05


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_default_config_is_valid(task):
    build_config({"task": task})


@pytest.mark.parametrize("values, needle", [
    ({"lr_studnet": 0.1}, "lr_studnet: unknown key"),
    ({"lr_student": 0}, "lr_student: must be > 0"),
    ({"lr_generator": -1e-3}, "lr_generator: must be > 0"),
    ({"n_student": 0}, "n_student: must be >= 1"),
    ({"student_fraction": 1.5}, "student_fraction: must be in (0, 1)"),
    ({"student_fraction": 0.0}, "student_fraction: must be in (0, 1)"),
    ({"epochs": "ten"}, "epochs: expected an integer"),
    ({"nesterov": "maybe"}, "nesterov: expected true/false"),
    ({"student": "vgg"}, "student: unknown 'vgg'; choose from"),
    ({"student_loss": "huber"}, "student_loss: unknown 'huber'; choose from ['kl', 'l1', 'l2']"),
    ({"task": "imagenet"}, "task: unknown 'imagenet'"),
    ({"scheduler": "step"}, "scheduler: unknown 'step'"),
])
def test_bad_values_are_named(values, needle):
    with pytest.raises(ConfigError) as e:
        build_config(values)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config({"lr_student": -1, "n_generator": 0, "bogus": 1})
    msg = str(e.value)
    assert "bogus" in msg and "n_generator" in msg and "lr_student" in msg


def test_any_step_ratio_is_valid():
    for ns, ng in ((5, 1), (15, 1), (1, 5)):
        cfg = build_config({"n_student": ns, "n_generator": ng})
        assert (cfg.n_student, cfg.n_generator) == (ns, ng)


def test_parse_value_types():
    assert parse_value("epochs", "3") == 3
    assert parse_value("lr_student", "1e-2") == 0.01
    assert parse_value("nesterov", "true") is True
    assert parse_value("student_fraction", "none") is None
    assert parse_value("milestones", "0.3,0.6") == (0.3, 0.6)
    assert set(FIELDS) >= {"lr_student", "lr_generator", "student_fraction", "n_student", "n_generator"}


def test_a_config_carries_the_task_it_was_built_with_and_never_resolves_it_again(monkeypatch):
    """The task is resolved once (by a command, a space, a plan) and handed down: a config built with it keeps that
    very ``Task`` (a folder task's folder need not exist where a trial runs), not a key of the config; a name that is
    not the task handed down is refused."""
    import trainable.tasks as tasks
    from trainable.config import config_to_dict, recipe_value

    task = TASKS["digits"]
    monkeypatch.setattr(tasks, "get_task", lambda name: pytest.fail(f"{name} resolved again"))
    cfg = build_config({"lr_student": 0.05}, task=task)
    assert cfg.task_spec is task and cfg.task == "digits" and cfg.batch_size == task.defaults["batch_size"]
    assert "task_spec" not in config_to_dict(cfg) and "task_spec" not in FIELDS
    assert recipe_value(cfg, "w_bn") == task.defaults["w_bn"]
    with pytest.raises(ConfigError, match="'mnist' is not the run's task 'digits'"):
        build_config({"task": "mnist"}, task=task)
