"""Whether a search folder is whole: each record, the study journal, Tune's state and ``best/`` checked on its own,
then the records checked against each other (a journal cut at a line boundary reads as whole alone). What
``report.py`` and ``--resume`` run before they read or change anything; ``results.repair`` mends what they find."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from base.layout import (
    BEST_DIR,
    BEST_MANIFEST,
    BEST_TRIAL,
    CHECKPOINT_PREFIX,
    CONFIRM_PLAN,
    CONFIRM_RESULTS,
    META_FILE,
    SCHEDULER_FILE,
    STUDY_FILE,
    TRIAL_PREFIX,
    has_tune_state,
)
from results.journal import check_journal, newest_by_ray_id, open_study, study_ray_ids
from results.recordfile import DamagedRecord, file_digest, read_record, write_record
from results.schedule_record import scheduler_record
from results.tunefiles import check_tune_state, tune_trials

# The records a search keeps (JSON, with a checksum).
RECORDS = (META_FILE, SCHEDULER_FILE, CONFIRM_PLAN, CONFIRM_RESULTS)
RETELL = "each finished trial's outcome is told to the study again from the scheduler's record"


def running_but_finished(folder: str | Path, journal: str | Path | None = None) -> list[str]:
    """The trials the scheduler recorded as finished or stopped whose newest record in the study is still running (a
    study journal cut short after they were told, or a kill between the scheduler's record and the study's)."""
    folder = Path(folder)
    study = open_study(journal or folder / STUDY_FILE)
    if study is None:
        return []
    scheduler = scheduler_record(folder / SCHEDULER_FILE)
    newest = newest_by_ray_id(study)
    return [tid for tid in [*scheduler["finished"], *scheduler["stopped"]]
            if tid in newest and newest[tid].state.name == "RUNNING"]


def check_agreement(folder: str | Path, journal: str | Path | None = None) -> list[DamagedRecord]:
    """The study, the scheduler's record and Tune's trials name the same trials: every trial Tune recorded, and every
    trial the scheduler ordered or decided on, is in the study (its setting is asked there before Tune or the
    scheduler hears of it), and every trial Tune recorded of a repeatable search is in the scheduler's order. A study
    journal cut at a record's end, or a record emptied, passes every check of its own and fails this one. ``journal``:
    the study journal to check in place of the folder's (a repair's result, before it is written)."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        return []
    journal = Path(journal or folder / STUDY_FILE)
    scheduler = scheduler_record(folder / SCHEDULER_FILE)
    tune_ids = [t["trial_id"] for t in tune_trials(folder)] if has_tune_state(folder) else []
    decided = [*(scheduler.get("order") or []), *scheduler["stopped"], *scheduler["finished"], *scheduler["errored"]]
    study = study_ray_ids(journal) if journal.is_file() else None
    found = []
    named = sorted(set(tune_ids) | set(decided))
    if named and (study is None or not set(named) <= study):
        have = len(set(named) & (study or set()))
        found.append(DamagedRecord(folder / STUDY_FILE, f"it holds {have} of the {len(named)} trials that Tune and "
                                   "the scheduler recorded: cut short or replaced", repairable=False))
    running = running_but_finished(folder, journal) if not found and (folder / BEST_TRIAL).is_file() else []
    if running:  # a finished search: nothing will tell them again
        found.append(DamagedRecord(folder / STUDY_FILE, f"it has {len(running)} trial(s) running that the scheduler "
                                   f"recorded as finished, e.g. {running[0]}: cut short", repair=RETELL))
    order = scheduler.get("order")
    if order is not None and not set(tune_ids) <= set(order):
        found.append(DamagedRecord(folder / SCHEDULER_FILE, f"its order names {len(set(tune_ids) & set(order))} of "
                                   f"the {len(set(tune_ids))} trials Tune recorded: replaced by an older copy",
                                   repairable=False))
    return found


def _manifest_entries(folder: Path, under: Path) -> dict[str, dict[str, Any]]:
    """Size and checksum of the file ``under``, or of every file in the folder ``under``, by path in ``folder``."""
    files = [under] if under.is_file() else sorted(p for p in under.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in files if not p.name.startswith(".")}


def write_best_manifest(best: str | Path, folder: str | Path, checkpoint: str) -> None:
    """``manifest.json`` of the ``best/`` being written at ``best`` (in the search ``folder``): the size and checksum
    of each of its files and of the winner's checkpoint (``checkpoint``, relative to the folder), so that
    ``report.py`` and ``--resume`` tell a changed or missing one from a whole one."""
    best, folder = Path(best), Path(folder)
    files = {rel: v for rel, v in _manifest_entries(best, best).items() if rel != Path(BEST_MANIFEST).name}
    ck = folder / checkpoint
    write_record(best / Path(BEST_MANIFEST).name, {
        "files": files, "checkpoint": checkpoint,
        "checkpoint_files": _manifest_entries(folder, ck) if ck.exists() else {}})


def check_best(folder: str | Path) -> list[DamagedRecord]:
    """The winner a finished search hands over (``best/``) and the checkpoint it was made from, against
    ``best/manifest.json``. A search exported before manifests were written has none: nothing to check. The winner's
    checkpoint is checked where its trial's checkpoints are on this disk (a working copy of a search on a URI holds
    none)."""
    folder = Path(folder)
    if not (folder / BEST_TRIAL).is_file():
        return []
    try:
        manifest = read_record(folder / BEST_MANIFEST)
    except DamagedRecord as e:
        return [DamagedRecord(folder / BEST_DIR, e.why)]
    if manifest is None:
        return []
    found = []
    for rel, want in sorted((manifest.get("files") or {}).items()):
        path = folder / BEST_DIR / rel
        if not path.is_file():
            found.append(DamagedRecord(folder / BEST_DIR, f"its {rel} is missing"))
        elif path.stat().st_size != want.get("size") or file_digest(path) != want.get("sha256"):
            found.append(DamagedRecord(folder / BEST_DIR, f"its {rel} does not match its checksum in {BEST_MANIFEST}: "
                                                          "changed since the export"))
    ck = folder / str(manifest.get("checkpoint") or "")
    trial = next((p for p in ck.parents if p.name.startswith(TRIAL_PREFIX)), None)
    here = list(trial.glob(f"{CHECKPOINT_PREFIX}*")) if trial is not None and manifest.get("checkpoint") else []
    for rel, want in sorted((manifest.get("checkpoint_files") or {}).items()):
        path = folder / rel
        if here and (not path.is_file() or path.stat().st_size != want.get("size")
                     or file_digest(path) != want.get("sha256")):
            found.append(DamagedRecord(path, f"the winner's checkpoint that best/ was made from is "
                                             f"{'missing' if not path.is_file() else 'changed'}", repairable=False))
            break
    return found[:1]


def check_records(folder: str | Path) -> list[DamagedRecord]:
    """Every record of the search at ``folder`` that is damaged (each with what to do): the tool's own records, the
    study journal, Tune's state files, then whether they agree on the trials (only once each is whole)."""
    found = []
    for name in RECORDS:
        try:
            read_record(Path(folder) / name)
        except DamagedRecord as e:
            found.append(e)
    try:
        check_journal(Path(folder) / STUDY_FILE)
    except DamagedRecord as e:
        found.append(e)
    found += check_tune_state(folder)
    found += check_best(folder)
    return found or check_agreement(folder)


def damage_of(check, path: Path) -> DamagedRecord | None:
    try:
        check(path)
    except DamagedRecord as e:
        return e
    return None
