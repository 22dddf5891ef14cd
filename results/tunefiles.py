"""Tune's files in a search folder, read without Ray: the trials of its experiment state and whether the state a
resume restores is whole. Their names are ``base.internals``' (Tune's layout, fenced); nothing here writes them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.layout import (
    EXPERIMENT_STATE,
    SEARCHER_STATE,
    TRIAL_PARAMS,
    TUNE_STATE,
    TUNER_FILE,
    has_tune_state,
    trial_folder_name,
    tune_started,
)
from results.recordfile import DamagedRecord


def tune_trials(folder: str | Path) -> list[dict[str, Any]]:
    """(trial_id, status, config, dir) of every trial Tune recorded in the experiment at ``folder``, read from its
    files without Ray: the status from the newest ``experiment_state-*.json`` (JSON), the config from each trial
    folder's ``params.json`` (Tune's copy of it), the folder named by the search's ``trial_dirname``."""
    states = sorted(Path(folder).glob(EXPERIMENT_STATE))
    if not states:
        raise UserError(f"{folder} is not a Ray experiment folder (no experiment_state-*.json); pass <storage>/<name> "
                        "of a search")
    out = []
    for t in _experiment_entries(states[-1]):
        tid = str(t.get("trial_id"))
        trial_dir = Path(folder) / trial_folder_name(tid)
        config = t.get("config") if isinstance(t.get("config"), dict) else _params(trial_dir / TRIAL_PARAMS)
        out.append({"trial_id": tid, "status": str(t.get("status", "PENDING")), "config": config or {},
                    "dir": trial_dir})
    return out


def _experiment_entries(path: Path) -> list[dict[str, Any]]:
    """The trials' entries of Tune's experiment state at ``path`` (JSON). Raises DamagedRecord."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [json.loads(t[0] if isinstance(t, list) else t) for t in data["trial_data"]]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        why = "empty" if path.is_file() and path.stat().st_size == 0 else f"unreadable: {type(e).__name__}"
        raise DamagedRecord(path, f"Tune's experiment state is {why}", repairable=False) from None
    if not all(isinstance(t, dict) and t.get("trial_id") for t in entries):
        raise DamagedRecord(path, "Tune's experiment state has a trial without an id", repairable=False)
    return entries


def _params(path: Path) -> dict[str, Any] | None:
    """A trial's ``params.json`` (Tune's copy of its config); None where it is missing, cut or not a mapping."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tune_state_files(folder: str | Path) -> list[Path]:
    """``tuner.pkl`` and the newest of each of Tune's state files (those a resume restores), where they exist."""
    folder = Path(folder)
    found = [folder / TUNER_FILE] if tune_started(folder) else []
    for pattern in TUNE_STATE:
        files = sorted(folder.glob(pattern))
        if files:
            found.append(files[-1])
    return found


def _whole_pickle(data: bytes) -> bool:
    """A pickle's first and last opcodes (PROTO ... STOP) are there: not empty, not cut short. Nothing is unpickled."""
    return len(data) > 2 and data[0] == 0x80 and data.endswith(b".")


def check_tune_state(folder: str | Path) -> list[DamagedRecord]:
    """Tune's files that a resume reads and that are empty, cut short or unreadable (a kill while Tune copied them,
    or damage afterwards), each as a DamagedRecord; and each recorded trial's ``params.json``."""
    found = []
    for path in tune_state_files(folder):
        try:
            data = path.read_bytes()
        except OSError as e:
            found.append(DamagedRecord(path, f"unreadable: {type(e).__name__}", repairable=False))
            continue
        if path.match(EXPERIMENT_STATE):
            try:
                _experiment_entries(path)
            except DamagedRecord as e:
                found.append(e)
        elif path.match(SEARCHER_STATE):
            try:
                ok = isinstance(json.loads(data).get("asked"), list)
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                found.append(DamagedRecord(path, "Tune's copy of the searcher's state is empty or cut short"))
        elif not _whole_pickle(data):
            found.append(DamagedRecord(path, f"Tune's state file is {'empty' if not data else 'cut short'}: a kill "
                                       "while Tune copied it, or damage since", repairable=False))
    if not any(d.path.match(EXPERIMENT_STATE) for d in found) and has_tune_state(folder):
        for t in tune_trials(folder):
            params = t["dir"] / TRIAL_PARAMS
            if params.exists() and _params(params) is None:
                found.append(DamagedRecord(params, "Tune's copy of the trial's settings is empty or cut short"))
    return found
