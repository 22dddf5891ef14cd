"""The checksummed record format: how each JSON record of a search folder (``akdtune/*.json``, ``best/manifest.json``)
is written, checked and read, and the one line a damaged one gets.

Every record is written atomically (``base.files``: a kill leaves the old file or the new one) and carries
``_record: {format, sha256}``, the checksum of the rest of it, so a file changed or cut by anything else is told
from a whole one: :func:`read_record` raises :class:`DamagedRecord`, one line naming the file and what to do, and
changes nothing; a record without a checksum is damage. Where ``--repair`` can mend a kind of damage without loss,
the line says how (``REPAIRS``; ``results.repair`` does it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from base import storage
from base.errors import UserError
from base.files import jsonable, write_json
from base.layout import BEST_DIR, CONFIRM_PLAN, CONFIRM_RESULTS, META_FILE, SCHEDULER_FILE, STUDY_FILE, TRIAL_PARAMS

# What --repair does about damage to the records it can mend without loss (results.repair); any other damaged record
# is restored from a copy of the folder.
REPAIRS = {
    CONFIRM_PLAN: "it is made again from the trials, the same plan",
    CONFIRM_RESULTS: "it is made again from the confirmation runs' checkpoints",
    STUDY_FILE: "the cut record is dropped: never complete, Optuna never read it",
    TRIAL_PARAMS: "it is written again from Tune's experiment state",
    ".pkl": "it is made again from the scheduler's order",  # the searcher's state (check_tune_state names the others)
    "/" + BEST_DIR: "best/ is exported again from the winner's checkpoint",
}
RECORD_FORMAT = "akdtune.record/1"
RECORD_KEY = "_record"


class DamagedRecord(UserError):
    """A record of a search folder that is not what this tool wrote: one line naming it and what to do."""

    def __init__(self, path: str | Path, why: str, repairable: bool = True, repair: str | None = None):
        self.path, self.why = Path(path), why
        self.repair = repair or next((what for name, what in REPAIRS.items() if self.path.as_posix().endswith(name)),
                                     None) if repairable else None
        what = (f"resume the search with --repair ({self.repair})" if self.repair
                else "restore it from a copy of the search folder")
        super().__init__(f"{path} is damaged ({why}); nothing was changed: {what}")

    @property
    def repairable(self) -> bool:
        return self.repair is not None


def _digest(data: dict[str, Any]) -> str:
    body = json.dumps(data, sort_keys=True, default=jsonable, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def write_record(path: str | Path, data: dict[str, Any]) -> None:
    """Write a record of a search folder (``<folder>/akdtune/....json``) atomically, with its checksum."""
    body = {k: v for k, v in data.items() if k != RECORD_KEY}
    write_json(path, {**body, RECORD_KEY: {"format": RECORD_FORMAT, "sha256": _digest(body)}})
    storage.written(path)  # a search on a URI: uploaded now, whole


# What each record must hold (key: its type), checked after its checksum: a record that this tool wrote holds them.
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    META_FILE: {"space": dict, "num_samples": int, "folder": str},
    SCHEDULER_FILE: {"rungs": dict, "stopped": dict, "finished": dict, "errored": dict},
    CONFIRM_PLAN: {"candidates": list, "runs": list},
    CONFIRM_RESULTS: {"candidates": list},
}


def _check_fields(path: str | Path, data: dict[str, Any]) -> None:
    name = next((n for n in REQUIRED if Path(path).as_posix().endswith(n)), None)
    for key, kind in (REQUIRED.get(name) or {}).items():
        if key not in data:
            raise DamagedRecord(path, f"it lacks {key!r}, which every such record holds")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise DamagedRecord(path, f"its {key!r} is a {type(data[key]).__name__}")


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A record of a search folder without its checksum; None when the file does not exist.

    Raises:
        DamagedRecord: not JSON, not a mapping, an unknown format or a checksum that does not match.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedRecord(path, f"unreadable: {type(e).__name__}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise DamagedRecord(path, "not valid JSON: cut short or overwritten") from None
    if not isinstance(data, dict):
        raise DamagedRecord(path, f"holds a {type(data).__name__}, not a record")
    check = data.pop(RECORD_KEY, None)
    if check is None:
        raise DamagedRecord(path, "it has no checksum, which this tool writes into every record: emptied or replaced")
    if not isinstance(check, dict) or check.get("format") != RECORD_FORMAT:
        raise DamagedRecord(path, f"unknown record format {check!r}")
    if check.get("sha256") != _digest(data):
        raise DamagedRecord(path, "its checksum does not match its contents: changed after it was written")
    _check_fields(path, data)
    return data


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
