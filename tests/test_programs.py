"""A ``.pt2`` program is read as data: a file crafted to run code is refused before anything in it is loaded.

Each crafted program is a real ``torch.export`` program of the digits CNN, rezipped with a payload that writes a
canary file. The control proves each payload is live: ``torch.export.load`` (and ``.module()``) on the same file
writes the canary. The project's loader refuses the file in one line and the canary is never written.
"""
import ast
import io
import json
import os
import zipfile

import pytest
import torch

from conftest import ROOT, run_main
from trainable.models import build_classifier
from trainable.programs import ProgramError, load_module, read_program
from trainable.sources import ModelSourceError, load_program


class Payload:
    """Unpickling this runs ``touch CANARY``."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    """A real program: the digits CNN, any batch size."""
    path = tmp_path_factory.mktemp("program") / "teacher.pt2"
    torch.manual_seed(0)
    net = build_classifier("cnn", 10, 1, 8).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(path))
    return path, net


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def rezip(path, m: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in m.items():
            z.writestr(name, data, zipfile.ZIP_DEFLATED if name.endswith("big.txt") else zipfile.ZIP_STORED)


def inner(m: dict[str, bytes], rest: str) -> str:
    """The archive's full name of ``rest`` (torch puts every member under one folder)."""
    prefix = next(iter(m)).split("/", 1)[0]
    return f"{prefix}/{rest}"


def edit_graph(m: dict[str, bytes], edit) -> None:
    name = inner(m, "models/model.json")
    graph = json.loads(m[name])
    edit(graph)
    m[name] = json.dumps(graph).encode()


def in_sample_inputs(m, canary):
    m[inner(m, "data/sample_inputs/model.pt")] = pickled((Payload(canary),))


def in_a_use_pickle_weight(m, canary):
    name = inner(m, "data/weights/model_weights_config.json")
    config = json.loads(m[name])
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    m[name] = json.dumps(config).encode()
    m[inner(m, f"data/weights/{meta['path_name']}")] = pickled(Payload(canary))


def as_legacy_weights(m, canary):
    m[inner(m, "data/weights/model.pt")] = pickled({"w": Payload(canary)})


def in_a_shape_expression(m, canary):
    """sympy.sympify evaluates the graph's shape expressions as Python."""
    def edit(graph):
        expr = next(v["sizes"][0]["as_expr"] for v in graph["graph_module"]["graph"]["tensor_values"].values()
                    if v["sizes"] and "as_expr" in v["sizes"][0])  # the batch size, a symbol
        expr["expr_str"] = f"__import__('os').system('touch {canary}') or {expr['expr_str']}"
    edit_graph(m, edit)


def in_guard_code(m, canary):
    """.module() compiles the program's guard code into the Python its calls run."""
    edit_graph(m, lambda graph: graph.update(guards_code=[f"__import__('os').system('touch {canary}') == 0"]))


def crafted_with(program, tmp_path, craft):
    """The program rezipped with ``craft(members, canary)`` applied: (the file, the canary it would write)."""
    m = members(program)
    canary = tmp_path / "canary"
    craft(m, canary)
    crafted = tmp_path / "crafted.pt2"
    rezip(crafted, m)
    return crafted, canary


def under_torch_alone(crafted, *inputs):
    """The control: what ``torch.export.load`` (then ``.module()`` and a call) does with the file, errors ignored."""
    try:
        module = torch.export.load(str(crafted)).module()
        if inputs:
            module(*inputs)
    except Exception:
        pass


PAYLOADS = {
    "sample inputs": (in_sample_inputs, "does not load with torch.load(weights_only=True)"),
    "use_pickle weight": (in_a_use_pickle_weight, "is marked use_pickle"),
    "legacy weights/model.pt": (as_legacy_weights, "a pickled legacy file"),
    "shape expression": (in_a_shape_expression, "calls something other than sympy arithmetic"),
}


@pytest.mark.parametrize("placement", sorted(PAYLOADS))
def test_a_program_with_a_pickled_or_evaluated_payload_is_refused_before_it_runs(program_file, tmp_path, placement):
    craft, needle = PAYLOADS[placement]
    crafted, canary = crafted_with(program_file[0], tmp_path, craft)
    with pytest.raises(ProgramError, match="refused before loading anything") as e:
        read_program(crafted)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelSourceError):
        load_program(str(crafted))
    assert not canary.exists()
    under_torch_alone(crafted)  # the control: torch's own loader runs the payload of the same file
    assert canary.exists(), f"the {placement} payload did not fire under torch.export.load"


def test_guard_code_is_dropped_not_run(program_file, tmp_path):
    path, net = program_file
    crafted, canary = crafted_with(path, tmp_path, in_guard_code)
    module = load_module(crafted)
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(module(x), net(x), atol=1e-5) and not canary.exists()
    under_torch_alone(crafted, x)  # the control: torch's module runs the guard code on its first call
    assert canary.exists()


def replace_target(graph, target):
    graph["graph_module"]["graph"]["nodes"][1]["target"] = target


@pytest.mark.parametrize("craft, needle", [
    (lambda m: edit_graph(m, lambda g: replace_target(g, "torch.os.system")), "calls 'torch.os.system'"),
    (lambda m: edit_graph(m, lambda g: replace_target(g, "torch.serialization.pickle.loads")), "not a torch operator"),
    (lambda m: edit_graph(m, lambda g: g["graph_module"]["module_call_graph"][0]["signature"].update(
        forward_arg_names=["x=__import__('os')"])), "where a program holds a plain name"),
    (lambda m: m.update({inner(m, "data/aotinductor/model/model.so"): b"\x7fELF"}), "holds data/aotinductor/model/model.so"),
    (lambda m: m.update({"elsewhere/archive_format": b"pt2"}), "not in one folder"),
    (lambda m: m.pop(inner(m, "data/weights/weight_0")), "is incomplete"),
    (lambda m: m.update({inner(m, "extra/big.txt"): b"0" * (64 * 2 ** 20)}), "(a zip bomb)"),
], ids=["os.system target", "pickle.loads target", "code in an input name", "AOTInductor library", "two folders",
        "missing payload", "zip bomb"])
def test_a_program_that_is_not_plain_data_is_refused_by_name(program_file, tmp_path, craft, needle):
    path, _ = program_file
    m = members(path)
    craft(m)
    crafted = tmp_path / "crafted.pt2"
    rezip(crafted, m)
    with pytest.raises(ProgramError) as e:
        read_program(crafted)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_checked_program_is_the_same_model(program_file):
    path, net = program_file
    module = load_module(path)
    x = torch.randn(7, 1, 8, 8)
    assert torch.allclose(module(x), net(x), atol=1e-5)


@pytest.mark.parametrize("content, needle", [
    (b"", "not a zip archive"),
    (b"not a zip", "not a zip archive"),
    (None, "not a zip archive"),  # the real program cut in half
    (b"PK\x05\x06" + b"\0" * 18, "holds no program"),  # an empty zip
], ids=["empty", "junk", "truncated", "empty zip"])
def test_a_damaged_program_is_one_line_with_no_logged_traceback(program_file, tmp_path, capfd, content, needle):
    path, _ = program_file
    if content is None:
        data = path.read_bytes()
        content = data[:len(data) // 2]
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(content)
    with pytest.raises(ProgramError) as e:
        read_program(bad)
    assert needle in str(e.value) or "not a torch.export program" in str(e.value)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and not err.strip()


def test_a_crafted_teacher_program_on_the_command_line_is_one_line_and_runs_nothing(program_file, tmp_path):
    crafted, canary = crafted_with(program_file[0], tmp_path, in_sample_inputs)
    r = run_main("trainable/run_akd.py", "--task", "digits", "--teacher-model", crafted, "--out", tmp_path / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "weights_only=True" in r.stderr and not canary.exists() and not (tmp_path / "run").exists()


def test_every_place_that_reads_a_program_goes_through_the_checked_loader():
    def loads_programs(node):
        f = node.func if isinstance(node, ast.Call) else None
        return (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Attribute)
                and f.value.attr == "export")

    calls = [f"{p.relative_to(ROOT)}:{node.lineno}" for d in ("base", "trainable", "search", "results", "bench")
             for p in sorted((ROOT / d).glob("*.py")) if p.name != "programs.py"
             for node in ast.walk(ast.parse(p.read_text())) if loads_programs(node)]
    assert calls == []


def _with_expression(m, expr_str):
    def edit(graph):
        expr = next(v["sizes"][0]["as_expr"] for v in graph["graph_module"]["graph"]["tensor_values"].values()
                    if v["sizes"] and "as_expr" in v["sizes"][0])  # the batch size, a symbol
        expr["expr_str"] = expr_str
    edit_graph(m, edit)


@pytest.mark.parametrize("expr, needle", [
    ("Symbol('s77', positive=True, integer=True) + 9**9**9", "raises to a power other than a number up to 64"),
    ("Symbol('s77', positive=True, integer=True) + ((9**64)**64)**64", "makes a number of up to 1,048,577 bits"),
    ("Symbol('s77', positive=True, integer=True) + PowByNatural(9, 387420489)", "a number up to 64 written out"),
])
def test_a_shape_expression_whose_numbers_sympy_would_compute_for_ever_is_refused_at_once(program_file, tmp_path,
                                                                                        expr, needle):
    """sympy computes the numbers of an expression as it reads it: 9**9**9 has 370 million digits (the tool once
    ran at 100% CPU with nothing printed, for ever). The check bounds them from the syntax tree, in a child process
    here so that a regression fails the test instead of hanging it."""
    import subprocess
    import sys

    path, _ = program_file
    m = members(path)
    _with_expression(m, expr)
    crafted = tmp_path / "crafted.pt2"
    rezip(crafted, m)
    code = ("import sys; from trainable.programs import ProgramError, read_program\n"
            "try:\n    read_program(sys.argv[1])\nexcept ProgramError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(crafted)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert needle in r.stdout and r.stdout.count("\n") == 1, r.stdout + r.stderr[-2000:]


def test_extra_members_are_judged_by_their_declared_size_and_never_unpacked(program_file, tmp_path, monkeypatch):
    """An extra/ member under the zip bomb's ratio but large (the crafted file held four of 512 MiB, 158 to one, and
    peaked at 5.8 GB before its refusal) is refused by its declared size before anything is unpacked; a small one is
    left packed, out of the copy torch loads (bench/hostile_program.py measures the peak)."""
    import random

    path, net = program_file
    m = members(path)
    rng = random.Random(0)
    chunk = bytes(rng.getrandbits(8) for _ in range(6_000)) + bytes(2 ** 20 - 6_000)  # about 150 to one packed
    m[inner(m, "extra/big.txt")] = chunk * 20  # 20 MiB declared
    crafted = tmp_path / "crafted.pt2"
    rezip(crafted, m)
    unpacked = []
    original = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: (unpacked.append(name),
                                                                                original(self, name, pwd))[1])
    with pytest.raises(ProgramError, match="holds extra/big.txt of 20,971,520 bytes, where torch.export writes small"):
        read_program(crafted)
    assert unpacked == []  # refused before any member was read
    m[inner(m, "extra/big.txt")] = b"a note"
    rezip(crafted, m)
    module = load_module(crafted)
    assert not any(name.endswith("extra/big.txt") for name in unpacked)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(module(x), net(x), atol=1e-5)
