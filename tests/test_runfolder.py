"""Every file name of a search folder and of a run's output folder has one owner: ``base/layout.py`` names them all
(the tool's records and outputs, and, through the fence ``base/internals.py``, the Tune files it reads); no other
module of the four packages writes one out."""
import ast
import re

from conftest import ROOT

# What names a file of a search folder or a run's output: the tool's records and outputs, and Tune's files.
FOLDER_FILES = ["tuner.pkl", "experiment_state", "search_gen_state", "searcher-state", "callback-states",
                "params.json", "result.json", "error.txt", "checkpoint_", "checkpoint.pt", "trials.parquet",
                "epochs.parquet", "study.journal", "scheduler.json", "search.json", "confirm.json", "confirmed.json",
                "live_report.json", "akdtune/", "best.partial", "report.html", "metrics.json", "trial.json",
                "manifest.json", "driver.lock", "final.json", "metrics.jsonl", "config.json", "student.pt", "student.onnx"]
OWNERS = ("base/layout.py", "base/internals.py")
NOT_FILES = {("base/storage.py", "~/.cache/akdtune/work"),  # where working copies live, outside any search folder
             ("results/checks.py", "checkpoint_files")}  # a key of best/manifest.json


def _path_literals(path):
    """String constants of a module that name a search-folder file (docstrings and messages, which hold spaces,
    left out: they may name a file for the reader)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and not re.search(r"\s", node.value):
            if any(name in node.value for name in FOLDER_FILES) or re.search(r"(^|/)trial_(\*|$)", node.value):
                yield node.lineno, node.value


def test_no_file_of_a_search_or_a_run_is_named_outside_the_layout_module():
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for package in ("base", "trainable", "search", "results")
             for p in sorted((ROOT / package).glob("*.py")) if p.relative_to(ROOT).as_posix() not in OWNERS
             for line, text in _path_literals(p) if (p.relative_to(ROOT).as_posix(), text) not in NOT_FILES]
    assert found == [], "name these through base/layout.py:\n" + "\n".join(found)


def test_the_scan_finds_a_file_named_by_path(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Reads scheduler.json."""\nimport os\nOPEN = os.path.join("akdtune", "scheduler.json")\n'
                 'MSG = "see summary/trials.parquet for why"\nGLOB = "trial_*"\n')
    assert sorted(text for _, text in _path_literals(f)) == ["scheduler.json", "trial_*"]
