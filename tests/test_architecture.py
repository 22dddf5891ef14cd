"""The house rules, read from the sources: which way imports run between the packages, no import cycle between the
project's modules (imports inside functions counted, so none is hidden), imports of the project at the top of a file
(one inside a function says why, on its line), and every function short enough to read on one screen."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("base", "trainable", "search", "results")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(module imported, node, inside a function) of every import in the file, ``from a import b`` as ``a.b`` too (one
    under ``if TYPE_CHECKING:`` included: a cycle for the type checker is a cycle for the reader)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node, id(node) in inside) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node, id(node) in inside))
            out += [(f"{node.module}.{a.name}", node, id(node) in inside) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {name for name, _, _ in _imports(p) if name in mods and name != m and name not in PACKAGES}
            for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_the_projects_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (imports inside functions included): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_one_way_between_the_packages():
    """The floors: base/ (the ground floor: errors, files, storage, metric names, the run folder's names, the fence
    around Tune's internals) imports none of the other three nor Ray; trainable/ (one run) imports neither search/ nor
    results/; results/ (a finished search read from its files) imports neither trainable/ nor search/ nor Ray; within
    trainable/ only the Tune trainable imports Ray."""
    rules = {"base": ("trainable", "search", "results", "ray"), "trainable": ("search", "results", "ray"),
             "results": ("trainable", "search", "ray")}
    for module, path in _modules().items():
        banned = rules.get(module.split(".")[0], ())
        for name, node, _ in _imports(path):
            top = name.split(".")[0]
            if top == "ray" and module == "trainable.tune_trainable":
                continue
            assert top not in banned, f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"


def test_the_projects_imports_are_at_the_top_of_each_file_or_say_why_not():
    for path in _modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, node, inside in _imports(path):
            if inside and name.split(".")[0] in PACKAGES:
                text = " ".join(lines[node.lineno - 1:node.end_lineno])
                assert "#" in text, f"{path.relative_to(ROOT)}:{node.lineno} imports {name} inside a function " \
                                    "without a comment saying why (move it to the top of the file)"


def test_every_function_fits_on_one_screen():
    long = []
    for path in [*_modules().values(), *sorted((ROOT / "bench").glob("*.py"))]:  # the benches keep the same rule
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)


# A word that is a metric's name but means the word there (an axis title, a progress bar's unit, the older name of a
# space's section).
NOT_A_METRIC = {("results/report.py", "epoch"), ("trainable/run_akd.py", "epoch"), ("trainable/teacher.py", "epoch"),
                ("search/space.py", "flops")}


def test_metric_names_are_written_only_as_their_constants():
    """A metric's name (``val_acc``, ``param_ratio``, ...) appears in the code only as ``base.metrics``'
    constant, so one name is one fact."""
    from base import metrics as M
    from trainable.config import FIELDS

    names = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str) and v.isidentifier()
             and ("_" in v or v in ("epoch", "flops")) and v not in FIELDS}  # a config key is the config's name
    found = []
    for module, path in _modules().items():
        if module == "base.metrics":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for j in ast.walk(tree) if isinstance(j, ast.JoinedStr) for n in ast.walk(j)}
        skip |= {id(b.body[0].value) for b in ast.walk(tree)
                 if isinstance(b, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and b.body
                 and isinstance(b.body[0], ast.Expr) and isinstance(b.body[0].value, ast.Constant)}
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and node.value in names and (rel, node.value) not in NOT_A_METRIC:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "metric names written out (use base.metrics' constant): " + ", ".join(found)


# Where a task's name is resolved into a ``Task``: where a name comes in as text (a command's arguments, a config's
# or a space's keys). Everything below is handed the ``Task`` (``AKDConfig.task_spec``, ``SearchPlan.task_spec``).
TASK_DOORS = {"trainable/tasks.py", "trainable/config.py", "trainable/train_teacher.py", "search/space.py"}


def test_a_task_is_resolved_by_its_name_only_where_the_name_comes_in():
    found = []
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and rel not in TASK_DOORS:
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in ("get_task", "resolve_task", "folder_task"):
                    found.append(f"{rel}:{node.lineno} {name}")
    assert not found, "a task resolved again by name (hand the Task down instead): " + ", ".join(found)
