"""Moves: a search folder may be copied, moved or archived and resumed from its new place. The records hold paths
relative to the folder; the objects Tune pickles with absolute paths are re-pointed on restore through
:func:`here`, from the process-wide table ``MOVED`` that :func:`relocate` fills at a resume."""
from __future__ import annotations

import os
from typing import Any

from base import storage

MOVED: dict[str, str] = {}  # this process: a folder the search was in before (search.json's ``folders``) -> where it is now


def folders_of(record: dict[str, Any] | None) -> list[str]:
    """Every folder the search recorded in ``record`` has been started or resumed in, first to last (``folders``; a
    search recorded before it kept them has only its last ``folder``)."""
    record = record or {}
    found = [f for f in record.get("folders") or [] if isinstance(f, str)]
    if isinstance(record.get("folder"), str) and record["folder"] not in found:
        found.append(record["folder"])
    return found


def relocate(recorded: list[str] | str | None, now: str) -> None:
    """The search once in each of the folders ``recorded`` is now at ``now``: every path into any of them that an
    object restored from Tune's pickles holds is re-pointed (:func:`here`), so a resume never writes into a folder it
    was copied from. Tune's ``tuner.pkl`` keeps the paths of the folder the search was started in, and its callback
    state those of the folder of its last session: both are re-pointed."""
    MOVED.clear()
    for old in ([recorded] if isinstance(recorded, str) else list(recorded or [])):
        if old and not storage.is_uri(old) and os.path.normpath(old) != os.path.normpath(now):
            MOVED[os.path.normpath(old)] = os.path.normpath(now)


def here(path: str | None) -> str | None:
    """``path`` re-pointed into the search's current folder where the search was copied or moved; else as it is."""
    if path is None:
        return None
    p = os.path.normpath(str(path))
    for old, new in sorted(MOVED.items(), key=lambda kv: -len(kv[0])):  # the most specific first
        if p == old or p.startswith(old + os.sep):
            return new + p[len(old):]
    return str(path)
