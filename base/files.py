"""The one way this project writes a file: atomically.

Every file of a run or search folder (checkpoints, JSON records, Parquet summaries, the report, the
cached teacher) is written to a temporary file beside its target, flushed to disk, then moved over
the target with ``os.replace``: a kill at any moment leaves either the old file or the new one,
never half of one. Temporary names carry the process id, so two processes writing the same file
(two searches preparing one cached teacher) do not trample each other's temporary file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from base.errors import UserError, unwritable_line


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; on leaving the block it replaces ``path`` (parents created).

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def temporary_beside(path: Path) -> Path:
    """The temporary file beside ``path`` for this process (the suffix kept: some writers check it); a killed
    writer's temporary files of the same target are removed first."""
    remove_strays(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def remove_strays(path: str | Path) -> list[Path]:
    """Remove the temporary files beside ``path`` left by writers on this machine that are no longer running (a kill
    in the middle of a write); those of a live writer are left alone. The files removed."""
    path = Path(path)
    prefix, suffix, gone = f".{path.stem}.", f".tmp{path.suffix}", []
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(suffix)]
    except OSError:
        return gone
    for name in names:
        pid = name[len(prefix):len(name) - len(suffix)]
        if not pid.isdigit() or int(pid) == os.getpid() or running(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.parent / name)
            gone.append(path.parent / name)
    return gone


STRAY = re.compile(r"\..+\.(\d+)\.tmp(\.[^.]*)?\Z")  # temporary_beside's names: .<stem>.<pid>.tmp<suffix>


def sweep_strays(folder: str | Path) -> list[Path]:
    """Remove every temporary file under ``folder`` left by a writer on this machine that is no longer running (a kill
    in the middle of a write in a trial folder Tune then abandoned: no writer of that target comes again to remove
    it). The files removed."""
    gone = []
    for root, _, names in os.walk(folder):
        for name in names:
            m = STRAY.match(name)
            if m and int(m.group(1)) != os.getpid() and not running(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(root, name))
                    gone.append(Path(root, name))
    return gone


def running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """JSON, indented and with sorted keys; numpy/torch scalars, tuples and sets become plain values."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True, default=jsonable) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def torch_save(obj: Any, path: str | Path) -> None:
    import torch  # noqa: PLC0415 - results/ reads a search through this module without importing torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through the open file: the archive inside is named "archive", not after the temporary file


def jsonable(v: Any) -> Any:
    if isinstance(v, (set, tuple)):
        return list(v)
    if hasattr(v, "item"):  # numpy / torch scalars
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def cache_dir() -> Path:
    """The project's cache: trained digits teachers and the measured speed choices (``$AKDTUNE_CACHE``, else
    ``~/.cache/akdtune``)."""
    return Path(os.environ.get("AKDTUNE_CACHE", Path.home() / ".cache" / "akdtune"))


def missing_folders(folder: str | Path) -> list[Path]:
    """The folders of the path ``folder`` (itself included) that do not exist yet, outermost first: what making it
    creates, and what to remove again to leave nothing."""
    out = Path(folder).absolute()
    return [p for p in (*reversed(out.parents), out) if not p.exists()]


def check_makeable(folder: str | Path, flag: str) -> None:
    """``folder`` can be made (or is there): it is made and the folders it took are removed again, so that bad input
    leaves nothing. Raises UserError in one line (``flag`` names the option) for /proc/x, a read-only place, a name
    too long."""
    made = missing_folders(folder)
    try:
        for p in made:
            p.mkdir()
    except OSError as e:
        raise UserError(unwritable_line(e, f"pass a {flag} you can write to") or f"cannot make {flag} {folder} ({e})") \
            from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
