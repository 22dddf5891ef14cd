"""How things go wrong, in the words a user reads: the exceptions (a ``UserError`` is bad input: the CLIs print its one
line and exit 2), the exit codes, and the one line for an unknown name (the registry lookup), a refused write or a
full disk."""
from __future__ import annotations

import os
import re
import sys
from typing import Any

# Every command's exit codes (docs/exit-codes.md): done; anything else; bad input (a UserError's one line); interrupted
# and resumable (the command that finishes it is printed).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3


class UserError(Exception):
    """Bad input (config, space, checkpoint, path): one line saying what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A run configuration is invalid; the message lists every problem, by key."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit the run."""


class DataFreeViolation(RuntimeError):
    """A data-free run tried to read the teacher's training data."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the message names the loss and the step."""


def unknown(what: str, choices, also: str = "") -> str:
    """The one line for a name that is none of the choices: ``"<what>; choose from [...] <also>"``, e.g.
    ``unknown(f"task: unknown {name!r}", sorted(TASKS))``."""
    return f"{what}; choose from {choices}" + (f" {also}" if also else "")


def lookup(table: dict[str, Any], kind: str, name: str, error: type[Exception] = ValueError) -> Any:
    """``table[name]`` of a registry (tasks, models, generators, losses), or one line naming the choices."""
    if name not in table:
        raise error(unknown(f"unknown {kind} {name!r}", sorted(table)))
    return table[name]


# ---------------------------------------------------------------------------------------------
# A full disk: not bad input, not a bug; the run stops, what was written stays whole, and it resumes
# ---------------------------------------------------------------------------------------------
FULL_DISK_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (a quota): no room to write
FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


class DiskFull(OSError):
    """A write found no room (ENOSPC or a quota). Raised where the search notices it (a trial that failed for it)
    before anything records the failure, so that a resume trains the trial again."""


def full_disk(exc: BaseException | None) -> OSError | None:
    """The full-disk error in ``exc`` or anything it was raised from (a trial's error on a worker comes back as
    text inside Ray's and Tune's errors); None when it is something else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS:
            return exc
        text = str(exc)
        if any(t in text for t in FULL_DISK_TEXT):
            m = re.search(r"(?:No space left on device|Disk quota exceeded): '([^']+)'", text)
            return DiskFull(28, "No space left on device", m.group(1) if m else None)
        exc = getattr(exc, "cause", None) if isinstance(getattr(exc, "cause", None), BaseException) else (
            exc.__cause__ or exc.__context__)
    return None


def full_disk_line(err: OSError, folder: str, then: str) -> str:
    """One line: which filesystem is full, while writing what, and what to run once there is room."""
    where = err.filename or folder
    mount = os.path.abspath(where if os.path.exists(where) else folder)
    while not os.path.exists(mount) and mount != os.path.dirname(mount):
        mount = os.path.dirname(mount)
    with_dev = os.stat(mount).st_dev
    while mount != os.path.dirname(mount) and os.stat(os.path.dirname(mount)).st_dev == with_dev:
        mount = os.path.dirname(mount)
    writing = f" while writing {err.filename}" if err.filename else ""
    return f"no space left on {mount}{writing}; every record written so far is whole: free space and run: {then}"


# A target the tool cannot write to: not a bug, not a full disk; one line and exit 2 (nothing already written is lost)
UNWRITABLE_ERRNOS = (1, 2, 13, 20, 21, 30, 36)  # EPERM, ENOENT, EACCES, ENOTDIR, EISDIR, EROFS, ENAMETOOLONG


def unwritable_line(err: BaseException, then: str) -> str | None:
    """One line for a write refused by the filesystem (read-only, permission, a name too long, a path that is not a
    folder), or None where ``err`` is something else. ``then``: what to do about it."""
    if not isinstance(err, OSError) or err.errno not in UNWRITABLE_ERRNOS:
        return None
    target = f" {err.filename}" if err.filename else ""
    return f"cannot write{target} ({err.strerror or err}); {then}"


def told_unwritable(err: BaseException, then: str) -> int | None:
    """A command's ending for a write the filesystem refused: its one line (:func:`unwritable_line`) on stderr and
    the exit code of bad input; None (nothing printed) where ``err`` is something else."""
    line = unwritable_line(err, then)
    if line is None:
        return None
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE
