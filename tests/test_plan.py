"""SearchPlan: one precedence (command line > resumed record > --smoke > space) and every resume check, no Ray."""
import pickle
import re

import pytest
import yaml

from base.errors import UserError
from base.layout import CONFIRM_PLAN, CONFIRM_RESULTS, META_FILE, SCHEDULER_FILE, STUDY_FILE
from conftest import ROOT
from results.recordfile import write_record
from search.plan import SMOKE_BUDGET, SMOKE_CONFIG, resolve_plan
from search.run_search import build_parser

SPACE = {"budget": {"num_samples": 7, "max_epochs": 9, "grace_period": 2, "reduction_factor": 3,
                    "confirm_top_k": 2, "confirm_seeds": 4},
         "seed": 5, "fixed": {"n_generator": 1}, "params": {"lr_student": {"type": "float", "low": 0.01, "high": 0.2}}}


def plan_for(tmp_path, *extra, space=SPACE):
    f = tmp_path / "s.yaml"
    if not f.exists():
        f.write_text(yaml.safe_dump(space))
    argv = ["--space", str(f), "--storage", str(tmp_path / "runs"), *map(str, extra)]
    return resolve_plan(build_parser().parse_args(argv), argv)


def started_search(tmp_path, **record):
    """A search folder as a first session leaves it: Tune's tuner.pkl and our record."""
    exp = tmp_path / "runs" / "s"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({}))  # stands in for Tune's
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(SPACE))
    base = {"space": yaml.safe_load(f.read_text()), "task": "digits", "seed": 5, "num_samples": 7, "max_epochs": 9,
            "grace_period": 2, "reduction_factor": 3, "early_stopping": True, "confirm_top_k": 2, "confirm_seeds": 4}
    write_record(exp / META_FILE, {**base, "folder": str(exp), **record})
    return exp


def test_the_space_decides_when_nothing_else_does(tmp_path):
    p = plan_for(tmp_path)
    assert (p.num_samples, p.max_epochs, p.grace_period, p.reduction_factor) == (7, 9, 2, 3)
    assert (p.confirm_top_k, p.confirm_seeds, p.seed, p.early_stopping) == (2, 4, 5, True)
    assert p.name == "s" and p.local and p.path == str((tmp_path / "runs" / "s").resolve())
    assert p.trial_config == {"task": "digits", "seed": 5, "epochs": 9, "n_generator": 1}
    assert not p.resume and p.record is None and not p.finished


def test_smoke_overrides_the_space(tmp_path):
    p = plan_for(tmp_path, "--smoke")
    assert p.num_samples == SMOKE_BUDGET["num_samples"] and p.max_epochs == SMOKE_BUDGET["max_epochs"]
    assert p.confirm_top_k == SMOKE_BUDGET["confirm_top_k"] and p.seed == 5  # --smoke does not set the seed
    assert p.trial_config.items() >= SMOKE_CONFIG.items() and p.trial_config["epochs"] == SMOKE_BUDGET["max_epochs"]


def test_the_command_line_overrides_smoke_and_space(tmp_path):
    p = plan_for(tmp_path, "--smoke", "--num-samples", 11, "--seed", 3, "--confirm-top-k", 0, "--confirm-seeds", 5,
                 "--no-early-stopping")
    assert (p.num_samples, p.seed, p.confirm_top_k, p.confirm_seeds, p.early_stopping) == (11, 3, 0, 5, False)


def test_a_resume_keeps_what_the_search_was_started_with(tmp_path):
    started_search(tmp_path, num_samples=7, max_epochs=6, grace_period=3, confirm_top_k=1, seed=8,
                   early_stopping=False, teacher="/t.pt")
    p = plan_for(tmp_path, "--resume", "--smoke")  # the record beats --smoke and the space
    assert (p.max_epochs, p.grace_period, p.confirm_top_k, p.seed, p.early_stopping) == (6, 3, 1, 8, False)
    assert p.teacher_path == "/t.pt" and p.resume and p.record["seed"] == 8
    p = plan_for(tmp_path, "--resume", "--confirm-top-k", 3, "--seed", 2)  # the command line beats the record
    assert (p.confirm_top_k, p.seed) == (3, 2)


@pytest.mark.parametrize("setup, extra, needle", [
    (False, ["--resume"], "nothing to resume"),
    (True, [], "already exists"),
    (True, ["--resume", "--num-samples", 3], "started with --num-samples 7"),
], ids=["nothing there", "exists without --resume", "other trial count"])
def test_resume_checks(tmp_path, setup, extra, needle):
    if setup:
        started_search(tmp_path)
    with pytest.raises(UserError, match=needle):
        plan_for(tmp_path, *extra)


def test_a_changed_space_or_a_missing_record_cannot_be_resumed(tmp_path):
    exp = started_search(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SPACE, "seed": 6}))
    with pytest.raises(UserError, match="has changed since"):
        plan_for(tmp_path, "--resume")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPACE))
    (exp / META_FILE).unlink()
    with pytest.raises(UserError, match="search.json is missing"):
        plan_for(tmp_path, "--resume")


def test_a_finished_search_is_recognised(tmp_path):
    exp = started_search(tmp_path)
    assert not plan_for(tmp_path, "--resume").finished
    write_record(exp / CONFIRM_RESULTS, {"candidates": []})
    (exp / "best").mkdir()
    assert not plan_for(tmp_path, "--resume").finished  # best/ without its files: a kill during the export
    (exp / "best" / "trial.json").write_text("{}")
    assert plan_for(tmp_path, "--resume").finished


def test_record_fields_round_trip_through_a_resume(tmp_path):
    """What a new search records is what a resume reads back: one name per setting."""
    p = plan_for(tmp_path, "--num-samples", 4)
    rec = p.record_fields()
    for key in ("num_samples", "max_epochs", "grace_period", "reduction_factor", "confirm_top_k", "confirm_seeds",
                "seed", "early_stopping"):
        assert rec[key] == getattr(p, key)
    exp = tmp_path / "runs" / "s"
    (exp / META_FILE).parent.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({}))  # stands in for Tune's
    write_record(exp / META_FILE, {**rec, "folder": str(exp)})
    again = plan_for(tmp_path, "--resume")
    assert all(getattr(again, k) == getattr(p, k) for k in ("num_samples", "max_epochs", "grace_period", "seed"))


def test_shipped_spaces_resolve(tmp_path):
    for f in sorted((ROOT / "spaces").glob("*.yaml")):
        argv = ["--space", str(f), "--storage", str(tmp_path)]
        p = resolve_plan(build_parser().parse_args(argv), argv)
        assert p.max_epochs >= p.grace_period >= 1 and p.trial_config["epochs"] == p.max_epochs


# ------------------------------------------------------------------ damaged records: one line, nothing changed
JOURNAL = b'{"op_code": 0, "worker_id": "w", "study_name": "akdtune", "directions": [1]}\n'


def files_of(exp):
    return {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage, needle", [
    (lambda e: (e / SCHEDULER_FILE).write_text("{"), "scheduler.json is damaged (not valid JSON"),
    (lambda e: write_record(e / SCHEDULER_FILE, {"stopped": {}}) or (e / SCHEDULER_FILE).write_text(
        (e / SCHEDULER_FILE).read_text().replace('"stopped": {}', '"stopped": {"x": {}}')), "checksum does not match"),
    (lambda e: (e / STUDY_FILE).write_bytes(JOURNAL + b'{"op_code": 5, "wor'), "last record is cut short"),
    (lambda e: (e / STUDY_FILE).write_bytes(JOURNAL + b'{"op_code": 5\n' + JOURNAL), "record 2 of 3 is not valid JSON"),
    (lambda e: (e / CONFIRM_PLAN).write_text("[]"), "confirm.json is damaged (holds a list"),
], ids=["scheduler cut", "scheduler changed", "journal cut", "journal middle", "confirm plan"])
def test_a_damaged_record_is_refused_on_resume_and_nothing_changes(tmp_path, damage, needle):
    exp = started_search(tmp_path)
    damage(exp)
    before = files_of(exp)
    with pytest.raises(UserError, match=re.escape(needle)):
        plan_for(tmp_path, "--resume")
    assert files_of(exp) == before


def test_repair_mends_what_loses_nothing_and_refuses_the_rest(tmp_path, capsys):
    exp = started_search(tmp_path)
    (exp / STUDY_FILE).write_bytes(JOURNAL + b'{"op_code": 5, "wor')
    write_record(exp / CONFIRM_RESULTS, {"winner": None, "candidates": []})
    (exp / CONFIRM_RESULTS).write_text((exp / CONFIRM_RESULTS).read_text()[:-20])
    with pytest.raises(UserError, match="resume the search with --repair"):
        plan_for(tmp_path, "--resume")
    plan = plan_for(tmp_path, "--resume", "--repair")
    assert plan.resume and (exp / STUDY_FILE).read_bytes() == JOURNAL and not (exp / CONFIRM_RESULTS).exists()
    out = capsys.readouterr().out
    assert "study.journal: dropped a cut last record (19 bytes)" in out and "confirmed.json: removed" in out
    assert plan_for(tmp_path, "--resume").resume  # mended: a plain resume goes on
    (exp / SCHEDULER_FILE).write_text("{")  # what --repair cannot mend without loss: refused, nothing changed
    before = files_of(exp)
    with pytest.raises(UserError, match="scheduler.json is damaged .* restore it from a copy"):
        plan_for(tmp_path, "--resume", "--repair")
    assert files_of(exp) == before
    with pytest.raises(UserError, match="--repair mends the records of a search being resumed"):
        plan_for(tmp_path, "--repair")
