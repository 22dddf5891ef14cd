"""The documentation stays true: the README is a front door (at most 200 lines), the docs site builds with
``mkdocs build --strict`` (a broken link or a page left out of the nav fails), the reference of every space and
config key is the one the code's schema gives, and the commands of every block marked ``<!-- smoke-test -->`` run,
at smoke size, as a user would type them."""
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

MARK = "<!-- smoke-test -->"
# What a marked command gets added, to run at a test's size (a later option wins over the command's own).
SMOKE = {
    "search/run_search.py": ["--smoke", "--num-samples", "2", "--no-report"],
    "trainable/run_akd.py": ["--set", "iters_per_epoch=2", "--set", "batch_size=32"],
    "results/report.py": [],
}


def _reference_module():
    spec = importlib.util.spec_from_file_location("generate_reference", ROOT / "docs" / "generate_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the detail to a page of docs/"


def test_the_key_reference_is_what_the_codes_schema_gives():
    ref = _reference_module()
    page = (ROOT / "docs" / "spaces.md").read_text(encoding="utf-8")
    assert ref.page_with(page, ref.reference()) == page, "docs/spaces.md is out of date: run python docs/generate_reference.py"


def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs site is built with MkDocs (requirements.txt)")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "spaces" / "index.html").is_file()


def marked_commands(path: Path) -> list[list[str]]:
    """The python commands of every block marked ``MARK`` in a Markdown file, in order, each as its argv (``\\``
    continuations joined, comments dropped, ``a && b`` split; pip, ruff and pytest left out)."""
    lines, out, i = path.read_text(encoding="utf-8").splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() != MARK:
            i += 1
            continue
        assert lines[i + 1].startswith("```"), f"{path.name}:{i + 1}: {MARK} must stand right above a code block"
        i += 2
        block = []
        while not lines[i].startswith("```"):
            block.append(lines[i])
            i += 1
        text = "\n".join(block).replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0] == "python" and not argv[1:2] == ["-m"]:
                    out.append(argv)
    return out


def test_marked_blocks_are_found():
    found = marked_commands(ROOT / "README.md")
    assert ["python", "search/run_search.py", "--space", "spaces/capacity.yaml"] in found
    assert all(argv[1] in SMOKE for argv in found), [a[1] for a in found]


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/methods.md"])
def test_the_commands_of_the_marked_blocks_run(page, tmp_path, ray_address):
    """Each marked command runs in a folder of its own that holds the project as a checkout does (its runs/ written
    there), one page's commands in order: each exits 0 without a traceback."""
    for name in ("base", "search", "trainable", "results", "spaces"):
        (tmp_path / name).symlink_to(ROOT / name)
    commands = marked_commands(ROOT / page)
    assert commands, f"{page} has no {MARK} block"
    for argv in commands:
        script = argv[1]
        more = SMOKE[script] + (["--address", ray_address] if script == "search/run_search.py" else [])
        r = subprocess.run([sys.executable, *argv[1:], *more], capture_output=True, text=True, cwd=tmp_path,
                           timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT), BROWSER="true"))
        assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, f"{' '.join(argv)}\n{r.stderr[-2000:]}"
