"""The search folder's schema has one owner: ``results/record.py`` names every file of it (the tool's records and
the Tune files it reads) and is the one module that opens them by name."""
import ast
import re

from conftest import ROOT

# What names a file of a search folder: the tool's records and outputs, and Tune's files.
FOLDER_FILES = ["tuner.pkl", "experiment_state", "search_gen_state", "searcher-state", "callback-states",
                "params.json", "result.json", "error.txt", "checkpoint_", "checkpoint.pt", "trials.parquet",
                "epochs.parquet", "study.journal", "scheduler.json", "search.json", "confirm.json", "confirmed.json",
                "live_report.json", "akdtune/", "best.partial", "report.html", "metrics.json", "trial.json"]


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


def test_no_search_folder_file_is_named_outside_the_run_folder_module():
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for package in ("search", "results")
             for p in sorted((ROOT / package).glob("*.py")) if p.name != "record.py"
             for line, text in _path_literals(p)]
    assert found == [], "open these through results/record.py:\n" + "\n".join(found)


def test_the_scan_finds_a_file_named_by_path(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Reads scheduler.json."""\nimport os\nOPEN = os.path.join("akdtune", "scheduler.json")\n'
                 'MSG = "see summary/trials.parquet for why"\nGLOB = "trial_*"\n')
    assert sorted(text for _, text in _path_literals(f)) == ["scheduler.json", "trial_*"]


def test_the_checkpoint_file_tune_keeps_is_the_one_a_run_writes():
    from results.record import CHECKPOINT_NAME
    from trainable.akd import CHECKPOINT_FILE

    assert CHECKPOINT_NAME == CHECKPOINT_FILE
