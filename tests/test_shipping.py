"""What a search ships to the nodes of a Ray cluster (``search.cluster``): this project's packages and the user's own
modules named by a spec, never an installed package; and the door check's import on a node."""
import os
from pathlib import Path
from types import SimpleNamespace

from conftest import ROOT


def _plan(teacher_model=None, raw=None):
    return SimpleNamespace(teacher_model=teacher_model, space=SimpleNamespace(raw=raw or {}))


def test_the_specs_that_name_code_are_found_in_the_teacher_and_the_space():
    from search.cluster import code_specs

    raw = {"fixed": {"student": "mynets.students:Small", "note": "see: the paper", "teacher": "timm:resnet18"},
           "params": {"arch": {"type": "categorical", "choices": ["cnn", "other:Net", "torchvision:resnet18"]}}}
    assert code_specs(_plan("mynets:Teacher", raw)) == ["mynets.students:Small", "mynets:Teacher", "other:Net"]
    assert code_specs(_plan()) == []


def test_the_project_and_the_users_own_module_are_shipped_and_installed_packages_are_not(tmp_path, monkeypatch):
    from search.cluster import shipped_code

    (tmp_path / "mynets.py").write_text("class Net:\n    pass\n")
    (tmp_path / "ownpkg").mkdir()
    (tmp_path / "ownpkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    shipped = shipped_code(_plan("mynets:Net", {"fixed": {"student": "ownpkg.models:S", "x": "json.decoder:JSONDecoder",
                                                          "y": "torch.nn:Linear", "z": "nosuchmodule:X"}}))
    assert shipped[:4] == [str(ROOT / name) for name in ("base", "trainable", "search", "results")]
    assert shipped[4:] == [str(tmp_path / "mynets.py"), str(tmp_path / "ownpkg")]  # not json (stdlib) nor torch


def test_the_door_check_on_a_node_names_what_it_cannot_import():
    import torch

    from search.cluster import _node_check

    ok = _node_check(["json:loads"])
    assert ok == {"torch": torch.__version__, "errors": [], "storage": None}
    bad = _node_check(["nosuchmodule:Net", "json:nothing"])
    assert bad["errors"][0].startswith("cannot import 'nosuchmodule' for 'nosuchmodule:Net' (ModuleNotFoundError")
    assert bad["errors"][1] == "'json' has no callable 'nothing' for 'json:nothing'"
    assert Path(os.getcwd()).exists()


def test_a_sibling_file_that_the_users_module_imports_is_shipped_with_it(tmp_path, monkeypatch):
    import importlib
    import sys

    from search.cluster import shipped_code

    (tmp_path / "helpers_for_ship.py").write_text("WIDTH = 3\n")
    (tmp_path / "mynets_ship.py").write_text("import helpers_for_ship\n\nclass Net:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("mynets_ship")  # as the driver's teacher check imports it
        shipped = shipped_code(_plan("mynets_ship:Net"))
    finally:
        sys.modules.pop("mynets_ship", None)
        sys.modules.pop("helpers_for_ship", None)
    assert shipped[4:] == [str(tmp_path / "mynets_ship.py"), str(tmp_path / "helpers_for_ship.py")]
