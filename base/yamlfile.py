"""The one reader of the YAML files a user is handed (space files, a folder task's ``task.yaml``): data only.

``yaml.SafeLoader`` (no tags that build objects), UTF-8, bounded in bytes, in values once aliases are expanded (no
"billion laughs") and in depth, no key twice in a mapping; every problem is one line of the caller's error class
naming the file.
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from base.errors import UserError

MAX_YAML_NODES = 20_000  # after expanding aliases: refuses "billion laughs" style alias bombs
MAX_YAML_DEPTH = 20  # a space nests 3 or 4 levels deep, a task.yaml 2


def short(v: Any, limit: int = 80) -> str:
    """A value as it reads in one line of an error, cut to ``limit`` characters."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def read_yaml(path: str | Path, max_bytes: int, what: str, error: type[UserError] = UserError,
              max_values: int = MAX_YAML_NODES) -> Any:
    """The document in ``path``, read as data (see the module docstring). ``what`` names the kind of file in
    errors ("a space file"); ``max_values`` bounds its values once aliases are expanded. Raises ``error``."""
    p = Path(path)
    try:
        st = p.stat()  # follows a link: what would be read
        if not stat.S_ISREG(st.st_mode):  # a device (/dev/zero reads for ever), a pipe (blocks), a folder
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else \
                "a device or socket"
            raise error(f"{p}: {what} must be a regular file, and this is {kind}"
                        f"{' (through a link to ' + str(p.resolve()) + ')' if p.is_symlink() else ''}; pass a file")
        if st.st_size > max_bytes:
            raise error(f"{p}: {st.st_size:,} bytes is too large for {what} (limit {max_bytes:,})")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)  # never more than the limit, whatever the size said
        if len(data) > max_bytes:
            raise error(f"{p}: over {max_bytes:,} bytes is too large for {what} (it grew as it was read)")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise error(f"{p}: cannot be read ({e.strerror}); check the path and its permissions") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                _check_tree(root, p, error, max_values)
            return loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{p}: not valid YAML{where} ({short(problem, 120)}); fix the syntax") from None
    except RecursionError:
        raise error(f"{p}: nested too deeply (over {MAX_YAML_DEPTH} levels); write it out plainly") from None


def _check_tree(root, path: Path, error: type[UserError], max_values: int) -> None:
    """Bound the size (aliases expanded) and depth of a composed YAML tree; refuse duplicate keys."""
    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values:
            raise error(f"{path}: too large once its aliases are expanded (over {max_values:,} values); "
                        "write it out plainly")
        if depth > MAX_YAML_DEPTH:
            raise error(f"{path}: nested more than {MAX_YAML_DEPTH} levels deep; write it out plainly")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise error(f"{path}: key {short(key.value, 40)} appears twice at line "
                                    f"{key.start_mark.line + 1}; keep one")
                    seen.add(key.value)
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1) for v in node.value)
