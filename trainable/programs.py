"""``torch.export`` programs (``.pt2``) read as data: nothing in a file is unpickled, imported or run as Python.

``torch.export.load`` alone is not safe on a file from someone else (torch 2.14): it unpickles sample inputs and
legacy weight files with ``weights_only=False`` when the safe load fails, loads weights and constants marked
``use_pickle`` (and custom objects) with pickle, loads AOTInductor's native libraries, hands the shape expressions
of the graph to ``sympy.sympify`` (which evaluates them as Python), resolves a node's target as any attribute path
under ``torch`` (``torch.os.system`` is one), and compiles the program's guard code and the names of its inputs
into the Python of ``.module()``. So a program is read here first, from memory:

- the archive: one top-level folder, no name twice, only the members ``torch.export.save`` writes for plain
  programs (the graph, raw tensor payloads, their configs, the sample inputs, ``extra/`` text); anything else
  (legacy ``weights/*.pt`` or ``constants/*.pt``, AOTInductor, ExecuTorch, MTIA) is refused by name;
- payload configs: no entry marked ``use_pickle``, constants only raw tensors, every payload in the archive;
- sample inputs: they must load with ``torch.load(weights_only=True)`` (torch tries that first, so its unsafe
  fallback is never reached);
- the graph (``models/*.json``): every node's target an ATen/prims/higher-order operator or one of the symbolic
  operators export writes; every shape expression a sympy expression of symbols, numbers and a fixed list of
  functions (checked on its Python syntax tree); every other text a plain name (letters, digits, ``_ . + -``);
  no custom objects. The nodes' debugging metadata (stack traces, module paths) and guard code are dropped: the
  program runs without them.

The archive is then written again in memory from exactly the bytes that were checked, and ``torch.export.load``
reads that copy, so no difference between two zip readers can show the loader something else. Every refusal is
one ``ProgramError`` line naming the file and what it holds.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as C

from base.errors import UserError

MAX_UNPACKED_BYTES = 16 * 1024 ** 3  # a program's tensors unpacked; a zip bomb declares more
MAX_GRAPH_BYTES = 512 * 1024 ** 2  # one graph's JSON
MAX_PACKING = 200  # a member unpacking to over 200 times its packed size (and over 1 MiB) is a zip bomb
MAX_EXTRA_BYTES = 16 * 1024 ** 2  # an extra/ member (text torch.export.save writes when asked; never read here)
# Where a member may be, judged by its name before any member is unpacked; extra/ is left packed and out of the copy
# torch loads (it reads extra files only when asked for them).
MEMBER_FOLDERS = (C.MODELS_DIR, C.WEIGHTS_DIR, C.CONSTANTS_DIR, "data/sample_inputs/")
PLAIN_TEXT = re.compile(r"[A-Za-z0-9_.+\-]*\Z")  # names, fqns, dtypes, versions: nothing Python could run
SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")  # s0, u3, ...: the symbols export names shape variables
OPERATOR = re.compile(r"torch\.ops\.(aten|prims|higher_order)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?\Z")
# The non-ATen callables torch.export writes as node targets (symbolic shape arithmetic, tuple indexing).
SYMBOLIC_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
                                "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "lshift", "rshift")]
    + [f"torch.{n}" for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")]
    + ["math.trunc"])
# What a shape expression may call: sympy's arithmetic and relations, and torch's own sympy functions.
SYMPY_FUNCTIONS = frozenset((
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor", "ceiling",
    "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor"))
SYMPY_CONSTANTS = frozenset(("oo", "zoo", "nan", "true", "false", "True", "False"))
SYMBOL_KEYWORDS = frozenset(("positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                             "nonzero", "evaluate"))
SAFE_AST = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name, ast.Load,
            ast.Constant, ast.keyword, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
            ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.BitAnd, ast.BitOr, ast.Eq, ast.NotEq, ast.Lt,
            ast.LtE, ast.Gt, ast.GtE)
# Files of the archive that are plain text or raw bytes the loader never unpickles.
PLAIN_MEMBERS = frozenset((C.ARCHIVE_FORMAT_PATH, C.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
                           ".data/serialization_id", ".format_version", ".storage_alignment"))


class ProgramError(UserError):
    """A ``.pt2`` file refused before anything in it is loaded: names the file and what it holds."""


@contextlib.contextmanager
def _quiet():
    """torch's loader logs a traceback and warns where a file is not what it expects; our one line says it."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive._package")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def read_program(path: str | Path) -> torch.export.ExportedProgram:
    """The program in ``path``, checked as the module docstring says and loaded from the checked copy.

    Raises:
        ProgramError: the file is missing, not a program, or holds something the loader would unpickle or run.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProgramError(f"program file {path} not found; pass the path of a .pt2 file") from None
    except OSError as e:
        raise ProgramError(f"cannot read program file {path} ({e.strerror}); check the path and its permissions") from None
    members = check_archive(data, str(path))
    with _quiet():
        try:
            return torch.export.load(io.BytesIO(_repack(members)))
        except Exception as e:  # damaged inside (a graph torch cannot rebuild, payloads of the wrong size, ...)
            raise ProgramError(f"{path} is not a torch.export program torch can load ({type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0][:160]}); write one with "
                               "torch.export.save(torch.export.export(model, (x,)), PATH)") from None


def load_module(path: str | Path) -> torch.nn.Module:
    """``read_program(path).module()``: the program as a module to call. Raises ProgramError."""
    program = read_program(path)
    with _quiet():
        try:
            return program.module()
        except Exception as e:
            raise ProgramError(f"{path}: torch cannot make a module of this program ({type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0][:160]}); export the model again") from None


def _refuse(where: str, what: str) -> ProgramError:
    return ProgramError(f"{where} {what}; refused before loading anything (export the model again with "
                        "torch.export.save: a program of plain tensors holds nothing to unpickle or run)")


def check_archive(data: bytes, where: str) -> dict[str, bytes]:
    """The archive's members (full names, in order) once every one is checked; the graphs re-serialised without
    debugging metadata or guard code. Raises ProgramError."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _refuse(where, "names a member twice")
            if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                raise _refuse(where, f"unpacks to over {MAX_UNPACKED_BYTES:,} bytes")
            packed = [i for i in infos if i.file_size > MAX_PACKING * i.compress_size + 2 ** 20]
            if packed:  # torch.export.save stores its members; a zip bomb packs gigabytes in kilobytes
                raise _refuse(where, f"packs {packed[0].filename} {packed[0].file_size // max(1, packed[0].compress_size):,} "
                                     "to one (a zip bomb)")
            prefix = names[0].split("/", 1)[0] + "/" if names else ""
            if not prefix or any(not n.startswith(prefix) or n.endswith("/") for n in names):
                raise ProgramError(f"{where} is not a torch.export program (its files are not in one folder); "
                                   "write one with torch.export.save(torch.export.export(model, (x,)), PATH)")
            members = _read_members(z, infos, prefix, where)
    except zipfile.BadZipFile:
        raise ProgramError(f"{where} is not a torch.export program (not a zip archive: empty, cut short or another "
                           "kind of file); write one with torch.export.save(torch.export.export(model, (x,)), "
                           "PATH)") from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:  # corrupt or unsupported members
        raise ProgramError(f"{where} is a damaged archive ({type(e).__name__}); export the model again") from None
    if members.get(C.ARCHIVE_FORMAT_PATH) != C.ARCHIVE_FORMAT_VALUE.encode():
        raise ProgramError(f"{where} is not a torch.export program (no '{C.ARCHIVE_FORMAT_PATH}: "
                           f"{C.ARCHIVE_FORMAT_VALUE}' in it); write one with torch.export.save")
    models = [n[len(C.MODELS_DIR):-len(".json")] for n in members
              if n.startswith(C.MODELS_DIR) and n.endswith(".json")]
    if not models:
        raise ProgramError(f"{where} holds no program ({C.MODELS_DIR}*.json); write one with torch.export.save")
    allowed = set(PLAIN_MEMBERS)
    for m in models:
        if not PLAIN_TEXT.match(m):
            raise _refuse(where, f"names a program {m!r}")
        for legacy in (f"{C.WEIGHTS_DIR}{m}.pt", f"{C.CONSTANTS_DIR}{m}.pt"):
            if legacy in members:
                raise _refuse(where, f"holds {legacy}, a pickled legacy file the loader would unpickle unsafely")
        graph = f"{C.MODELS_FILENAME_FORMAT.format(m)}"
        members[graph] = _check_graph(members[graph], f"{where}: {graph}")
        allowed.add(graph)
        allowed |= _check_payloads(members, C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(m), C.WEIGHTS_DIR, where)
        allowed |= _check_payloads(members, C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(m), C.CONSTANTS_DIR, where)
        sample = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(m)
        if sample in members:
            _check_sample_inputs(members[sample], f"{where}: {sample}")
            allowed.add(sample)
    for name in members:
        if name not in allowed and not name.startswith(C.EXTRA_DIR):  # extra/: text the loader only decodes
            raise _refuse(where, f"holds {name}, which this tool does not load (AOTInductor, ExecuTorch and pickled "
                                 "payloads are native code or pickles)")
    return {prefix + n: v for n, v in members.items()}


def _read_members(z: zipfile.ZipFile, infos: list[zipfile.ZipInfo], prefix: str, where: str) -> dict[str, bytes]:
    """The members torch loads, by their names inside the folder ``prefix``: every member judged by its name and
    declared size before any is unpacked, then read one at a time; ``extra/`` is never unpacked."""
    for info in infos:
        rel = info.filename[len(prefix):]
        if rel.startswith(C.EXTRA_DIR):
            if info.file_size > MAX_EXTRA_BYTES:
                raise _refuse(where, f"holds {rel} of {info.file_size:,} bytes, where torch.export writes small text")
            continue
        if rel not in PLAIN_MEMBERS and not rel.startswith(MEMBER_FOLDERS):
            raise _refuse(where, f"holds {rel}, which this tool does not load (AOTInductor, ExecuTorch and pickled "
                                 "payloads are native code or pickles)")
        if rel.startswith(C.MODELS_DIR) and info.file_size > MAX_GRAPH_BYTES:
            raise _refuse(where, f"holds a graph {rel} of {info.file_size:,} bytes")
    return {info.filename[len(prefix):]: z.read(info.filename) for info in infos
            if not info.filename[len(prefix):].startswith(C.EXTRA_DIR)}


def _check_payloads(members: dict[str, bytes], config_name: str, folder: str, where: str) -> set[str]:
    """A weights or constants config: every entry a raw tensor in the archive (no pickle, no custom object)."""
    if config_name not in members:
        return set()
    try:
        config = json.loads(members[config_name])["config"]
        entries = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise _refuse(where, f"holds a {config_name} that is not a payload config") from None
    used = {config_name}
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise _refuse(where, f"{config_name}: entry {str(fqn)[:60]!r} is not a payload")
        path_name = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise _refuse(where, f"{config_name}: {str(fqn)[:60]!r} is marked use_pickle (the loader would unpickle "
                                 "it with weights_only=False)")
        if (not isinstance(path_name, str) or not PLAIN_TEXT.match(path_name) or meta.get("tensor_meta") is None
                or (folder == C.CONSTANTS_DIR and not path_name.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX))):
            raise _refuse(where, f"{config_name}: {str(fqn)[:60]!r} is not a raw tensor ({str(path_name)[:60]!r})")
        if folder + path_name not in members:
            raise ProgramError(f"{where} is incomplete: {config_name} names {folder + path_name}, which is not in the "
                               "archive; export the model again")
        used.add(folder + path_name)
    return used


def _check_sample_inputs(data: bytes, where: str) -> None:
    """torch loads sample inputs with ``weights_only=True`` first and falls back to an unsafe load: they must
    load the safe way."""
    try:
        with _quiet():
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        raise _refuse(where, "does not load with torch.load(weights_only=True): the loader would unpickle it "
                             "unsafely") from None


def _check_graph(data: bytes, where: str) -> bytes:
    """A program's graph JSON, checked (see the module docstring), without node metadata and guard code."""
    if len(data) > MAX_GRAPH_BYTES:
        raise _refuse(where, f"is over {MAX_GRAPH_BYTES:,} bytes")
    try:
        graph = json.loads(data)
    except (ValueError, RecursionError):
        raise ProgramError(f"{where} is not JSON (damaged); export the model again") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("graph_module"), dict):
        raise ProgramError(f"{where} is not a program's graph; export the model again")
    graph["guards_code"] = []  # Python source the loader would compile into .module(); input checks only
    stack: list[tuple[Any, str, str]] = [(graph, "", "")]
    while stack:
        node, key, at = stack.pop()
        if isinstance(node, dict):
            if "target" in node:  # a graph node (the schema's only "target")
                _check_target(node["target"], where, at)
                node["metadata"] = {}  # stack traces, module paths, source functions: debugging text only
            if key in ("custom_obj_values",) and node:
                raise _refuse(where, "holds custom (torchbind) objects")
            for k, v in node.items():
                if not isinstance(k, str) or not PLAIN_TEXT.match(k):
                    raise _refuse(where, f"has a key {str(k)[:60]!r} at {at or 'top'} that is not a plain name")
                if k == "target" or (k == "as_string" and isinstance(v, str)):  # the target is checked above; a
                    continue  # string argument is written into the module's code as repr(), which quotes it
                if k == "as_strings" and isinstance(v, list) and all(isinstance(s, str) for s in v):
                    continue
                if k == "expr_str":
                    _check_expression(v, where, f"{at}.{k}")
                    continue
                if k in ("in_spec", "out_spec") and isinstance(v, str):
                    _check_treespec(v, where, f"{at}.{k}")
                    continue
                stack.append((v, k, f"{at}.{k}"))
        elif isinstance(node, list):
            stack.extend((v, key, f"{at}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, str) and not PLAIN_TEXT.match(node):
            raise _refuse(where, f"holds {node[:60]!r} at {at}, where a program holds a plain name")
    return json.dumps(graph).encode()


def _check_target(target: Any, where: str, at: str) -> None:
    if not isinstance(target, str) or not (OPERATOR.match(target) or target in SYMBOLIC_TARGETS):
        raise _refuse(where, f"calls {str(target)[:80]!r} at {at}, which is not a torch operator")


def _check_treespec(text: str, where: str, at: str) -> None:
    """A pytree spec (JSON inside JSON): every text in it a plain name; its ``context`` fields are JSON once more."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        raise _refuse(where, f"has an input/output spec at {at} that is not JSON") from None
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("context"), str):
                try:
                    node = {**node, "context": json.loads(node["context"])}
                except (ValueError, RecursionError):
                    raise _refuse(where, f"has an input/output spec at {at} whose context is not JSON") from None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and not PLAIN_TEXT.match(node):
            raise _refuse(where, f"holds {node[:60]!r} in an input/output spec at {at}, where a spec holds names")


# sympy computes the numbers of an expression as it reads it (``9**9**9`` is 9**387420489: hours and gigabytes). A
# shape expression's numbers are small: its value's size is bounded from its syntax tree before sympy sees it.
MAX_EXPRESSION_BITS = 4096  # the bound on the size of any number an expression can make (a shape is under 2**63)
MAX_EXPONENT = 64  # an exponent (or a shift) is a number written out, at most this
SYMBOL_BITS = 64  # a symbol stands for a size: at most 2**63
POWERS = frozenset(("Pow", "FloatPow", "PowByNatural"))
SHIFTS = frozenset(("LShift",))


def _bits(node: ast.AST) -> float:
    """An upper bound on the size in bits of the number ``node`` (checked against ``SAFE_AST``) can make; raises
    ValueError for an exponent or a shift that is not a small number written out."""
    def exponent(e: ast.AST) -> float:
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.UAdd)):
            e = e.operand
        v = e.args[0] if isinstance(e, ast.Call) and getattr(e.func, "id", "") in ("Integer", "Float", "Rational") \
            and e.args else e
        if not isinstance(v, ast.Constant) or isinstance(v.value, bool) or not isinstance(v.value, (int, float)) \
                or not abs(v.value) <= MAX_EXPONENT:
            raise ValueError("an exponent that is not a small number")
        return abs(float(v.value))

    if isinstance(node, ast.Expression):
        return _bits(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        return float(abs(int(v)).bit_length()) if isinstance(v, (bool, int)) else (
            SYMBOL_BITS if isinstance(v, str) else 1100.0)  # a float: at most about 2**1024
    if isinstance(node, ast.Name):
        return float(SYMBOL_BITS)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return _bits(node.left) * max(1.0, exponent(node.right))
        left, right = _bits(node.left), _bits(node.right)
        return left + right if isinstance(node.op, (ast.Mult, ast.Div, ast.FloorDiv)) else max(left, right) + 1
    if isinstance(node, ast.UnaryOp):
        return _bits(node.operand)
    if isinstance(node, ast.Call):
        name = getattr(node.func, "id", "")
        if name == "Symbol":
            return float(SYMBOL_BITS)
        if name in POWERS and len(node.args) == 2:
            return _bits(node.args[0]) * max(1.0, exponent(node.args[1]))
        if name in SHIFTS and len(node.args) == 2:
            return _bits(node.args[0]) + exponent(node.args[1])
        parts = [_bits(a) for a in node.args]
        return sum(parts) + len(parts) if parts else 1.0  # products and sums alike: at most the sum of the sizes
    return float(sum(_bits(c) for c in ast.iter_child_nodes(node)) + 1)  # relations, and/or: their parts


def _check_expression(text: Any, where: str, at: str) -> None:
    """A shape expression (``sympy.sympify`` evaluates it): symbols, numbers, arithmetic and the functions listed
    in ``SYMPY_FUNCTIONS``, by its Python syntax tree; no number it can make over ``MAX_EXPRESSION_BITS`` bits."""

    def bad(why: str) -> ProgramError:
        return _refuse(where, f"has a shape expression at {at} that {why}: {str(text)[:80]!r}")

    if not isinstance(text, str) or len(text) > 100_000:
        raise bad("is not a short text")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise bad("is not an expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, SAFE_AST):
            raise bad(f"uses Python's {type(node).__name__}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_FUNCTIONS:
                raise bad("calls something other than sympy arithmetic")
            if any(k.arg not in SYMBOL_KEYWORDS or not isinstance(k.value, ast.Constant)
                   or not isinstance(k.value.value, bool) for k in node.keywords):
                raise bad("passes an argument other than a symbol's assumptions")
        elif isinstance(node, ast.Name):
            if not (node.id in SYMPY_FUNCTIONS or node.id in SYMPY_CONSTANTS or SYMBOL.match(node.id)):
                raise bad(f"names {node.id!r}")
        elif isinstance(node, ast.Constant):
            v = node.value
            if not (isinstance(v, (bool, int, float)) or (isinstance(v, str) and SYMBOL.match(v))):
                raise bad("holds a constant other than a number or a symbol's name")
    try:
        size = _bits(tree)
    except (ValueError, RecursionError):
        raise bad(f"raises to a power other than a number up to {MAX_EXPONENT} written out") from None
    if size > MAX_EXPRESSION_BITS:
        raise bad(f"makes a number of up to {size:,.0f} bits (a shape is under {SYMBOL_BITS})")


def _repack(members: dict[str, bytes]) -> bytes:
    """A new archive of exactly the checked members (stored, in their order)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()
