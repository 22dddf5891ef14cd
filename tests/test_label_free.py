"""Selection without labels: a folder task with only a task.yaml, agreement with the teacher on a proxy set, the
search ranking and confirming on it and saying that no accuracy was measured."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from base import metrics as M
from base.errors import ConfigError, UserError
from conftest import ROOT, run_main, tiny_values
from trainable.akd import AKDRun
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import build_config
from trainable.images import as_task_name
from trainable.proxy import PROXY_SEED, build_proxy, classes_of, generator_images
from trainable.tasks import get_task, load_eval_data

DIGITS_YAML = "classes: 10\nchannels: 1\nimage_size: 8\nmean: [0.5]\nstd: [0.5]\nrecipe: digits\n"


def unlabelled_task(root, text=DIGITS_YAML, images=0):
    """A folder task without labels: a task.yaml and ``images`` unlabelled 8 x 8 images (none by default)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.yaml").write_text(text)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / f"{i}.png")
    return as_task_name(f"folder:{root}")


def test_a_task_yaml_with_the_class_count_and_no_images_is_a_task_without_labels(tmp_path):
    name = unlabelled_task(tmp_path / "t")
    task = get_task(name)
    assert not task.labelled and task.num_classes == 10 and (task.channels, task.image_size) == (1, 8)
    assert task.defaults["teacher"] == "cnn"  # recipe: digits
    assert any("no labels" in n and "no accuracy is measured" in n for n in task.notes)
    data = load_eval_data(get_task(name))
    assert not data.labelled and data.val_y is None and len(data.val_x) == 0


def test_unlabelled_images_are_split_and_become_the_proxy(tmp_path):
    name = unlabelled_task(tmp_path / "t", DIGITS_YAML.replace("classes: 10", "classes: [a, b, c, d, e, f, g, h, i, j]"),
                           images=40)
    task = get_task(name)
    assert not task.labelled and task.classes[0] == "a"
    data = load_eval_data(get_task(name))
    assert len(data.val_x) + len(data.test_x) == 40 and data.test_y is None
    proxy = build_proxy(build_config({"task": name}), task, data)
    assert "40 unlabelled images" in proxy.source and len(proxy.val_x) == 20


@pytest.mark.parametrize("text, match", [
    (DIGITS_YAML.replace("recipe: digits", "recipe: nosuch"), "recipe must name a shipped task"),
    ("classes: 1\nchannels: 1\nimage_size: 8\n", "classes must be the teacher's class count"),
    ("classes: 10\n", "give channels and image_size"),
])
def test_bad_task_yaml_of_a_task_without_labels_is_one_line(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        get_task(unlabelled_task(tmp_path / "t", text))


def test_selection_settings_are_checked(tmp_path):
    name = unlabelled_task(tmp_path / "t")
    with pytest.raises(ConfigError, match="selection: accuracy needs labelled images"):
        build_config({"task": name, "selection": "accuracy"})
    with pytest.raises(ConfigError, match="selection: unknown 'labels'"):
        build_config({"selection": "labels"})
    with pytest.raises(ConfigError, match="proxy: .* is not a folder"):
        build_config({"selection": "agreement", "proxy": f"folder:{tmp_path / 'missing'}"})
    with pytest.raises(ConfigError, match="proxy: unknown 'teacher'"):
        build_config({"proxy": "teacher"})
    assert build_config({"task": name}).selection == "auto"


def test_the_generator_proxy_is_fixed_and_spread_over_the_teachers_classes(digits_teacher):
    a, b = generator_images(get_task("digits"), 512), generator_images(get_task("digits"), 512, PROXY_SEED)
    assert torch.equal(a, b) and a.shape == (512, 1, 8, 8)
    before = torch.get_rng_state()
    generator_images(get_task("digits"), 64, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # a run's own random stream is untouched
    classes = classes_of(digits_teacher, a, torch.device("cpu"))
    assert len(classes.unique()) >= 5  # not one class (a random generator in eval mode gives one)


def test_a_run_selecting_on_agreement_reports_it_and_resumes_it(tmp_path, digits_teacher, digits_data):
    cfg = build_config(tiny_values(selection="agreement", proxy_images=64, early_stop_patience=5))
    run = AKDRun(cfg, digits_teacher, digits_data, torch.device("cpu"))
    assert run.selection == M.VAL_AGREEMENT and "frozen generator" in run.proxy.source
    h = run.fit(max_epochs=1)
    assert 0 <= h[0][M.VAL_AGREEMENT] <= 1 and M.VAL_ACC in h[0]  # labels exist: accuracy is measured as well
    assert run.best_selected == h[0][M.VAL_AGREEMENT]
    assert M.TEST_AGREEMENT in run.measure("test") and M.TEST_ACC in run.measure("test")
    save_checkpoint(run, tmp_path / "c.pt")
    run.fit()
    again = AKDRun(cfg, digits_teacher, digits_data, torch.device("cpu"))
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt"))  # restores the random state the first run went on from
    assert again.best_selected == h[0][M.VAL_AGREEMENT]
    again.fit()

    def results(history):
        return [{k: v for k, v in m.items() if k != M.IMAGES_PER_S} for m in history]

    assert results(again.history) == results(run.history)


def test_run_akd_on_a_task_without_labels(tmp_path, digits_teacher):
    torch.save(digits_teacher.state_dict(), tmp_path / "teacher.pt")
    name = unlabelled_task(tmp_path / "t")
    sets = [a for kv in ("epochs=2", "iters_per_epoch=2", "batch_size=16", "proxy_images=32") for a in ("--set", kv)]
    r = run_main("trainable/run_akd.py", "--task", name, "--teacher", tmp_path / "teacher.pt", *sets,
                 "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "no accuracy is measured" in r.stdout and "val_agreement" in r.stdout
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert set(final) == set(M.FINAL_METRICS)
    assert final[M.TEST_ACC] is None and final[M.TEACHER_VAL_ACC] is None and 0 <= final[M.TEST_AGREEMENT] <= 1
    assert final[M.SELECTED_ON] == M.VAL_AGREEMENT and not (tmp_path / "run" / "confusion_test.csv").exists()


def test_a_search_without_labels_refuses_selection_accuracy(tmp_path, digits_teacher):
    torch.save(digits_teacher.state_dict(), tmp_path / "teacher.pt")
    name = unlabelled_task(tmp_path / "t")
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--task", name, "--teacher",
                 tmp_path / "teacher.pt", "--selection", "accuracy", "--storage", tmp_path / "runs", "--smoke")
    assert r.returncode == 2 and "selection: accuracy needs labelled images" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_digits_search_with_labels_withheld_runs_end_to_end(tmp_path, digits_teacher, ray_address):
    torch.save(digits_teacher.state_dict(), tmp_path / "teacher.pt")
    name = unlabelled_task(tmp_path / "t")
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--task", name, "--teacher",
                 tmp_path / "teacher.pt", "--storage", tmp_path / "runs", "--smoke", "--num-samples", 3)
    assert r.returncode == 0, r.stderr
    assert "accuracy          not measured: the task has no labelled images" in r.stdout
    assert "selected on       val_agreement" in r.stdout
    exp = tmp_path / "runs" / "capacity"
    best = json.loads((exp / "best" / "metrics.json").read_text())
    assert best[M.TEST_ACC] is None and best[M.VAL_ACC] is None and len(best["seeds"]) == 2
    assert 0 <= best[M.TEST_AGREEMENT] <= 1 and best["test_agreement_std"] >= 0
    assert (exp / "best" / "student.pt2").is_file() and not (exp / "best" / "confusion_test.csv").exists()
    record = json.loads((exp / "akdtune" / "search.json").read_text())
    assert record[M.SELECTED_ON] == M.VAL_AGREEMENT and record[M.TEACHER_VAL_ACC] is None
    import pandas as pd

    trials = pd.read_parquet(exp / "summary" / "trials.parquet")
    assert trials["final_val_agreement"].notna().all() and trials["final_val_acc"].isna().all()
    assert trials["winner"].sum() == 1
    page = (exp / "report.html").read_text()
    assert "NO ACCURACY WAS MEASURED" in page and "Agreement with the teacher versus student size" in page
    # a resume may not change what the search selects on
    r = run_main("search/run_search.py", "--space", ROOT / "spaces" / "capacity.yaml", "--task", name, "--teacher",
                 tmp_path / "teacher.pt", "--storage", tmp_path / "runs", "--smoke", "--num-samples", 3, "--resume",
                 "--selection", "agreement")
    assert r.returncode == 2 and "was started with --selection" in r.stderr
