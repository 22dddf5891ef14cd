"""Each search trial's own log of what it reported (``akdtune/results/<trial id>.jsonl``), and JSON-lines results
read with a line cut by a kill skipped."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from base import storage
from base.files import jsonable
from base.layout import RESULTS_DIR


def result_log(folder: str | Path, trial_id: str) -> Path:
    """The file of a search trial's results, one JSON line per report, in the order they arrived."""
    return Path(folder) / RESULTS_DIR / f"{trial_id}.jsonl"


def append_result(folder: str | Path, trial_id: str, result: dict[str, Any]) -> None:
    """Add one reported result (without its config) to the trial's log; a kill can cut only the line being written.

    Tune's own ``result.json`` is a copy its driver uploads now and then, and the upload is copied back over the
    driver's newer lines when a paused trial resumes, so the lines reported since the last upload are lost (a
    repeatable search pauses trials whose rung decision waits). This log is written straight into the folder."""
    path = result_log(folder, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in result.items() if k != "config"}, default=_loggable)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    storage.written(path)


def _loggable(v: Any) -> Any:
    try:
        return jsonable(v)
    except TypeError:
        return str(v)


def read_result_lines(path: str | Path) -> list[dict[str, Any]]:
    """The results in a JSON-lines file (a trial's log or Tune's ``result.json``), a line cut by a kill skipped."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return out
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out
