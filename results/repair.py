"""``--repair``: mend what the other records rebuild without loss, after checking the result; refuse the rest in one
line before anything is changed."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from base.files import write_json
from base.layout import BEST_DIR, SCHEDULER_FILE, SEARCHER_STATE, STUDY_FILE, TRIAL_PARAMS
from results.checks import RECORDS, RETELL, check_agreement, check_best, damage_of
from results.journal import check_journal, journal_lines, repair_journal
from results.recordfile import read_record
from results.schedule_record import scheduler_record
from results.tunefiles import check_tune_state, tune_trials


def repair_records(folder: str | Path) -> list[str]:
    """Mend what can be mended without loss (``--repair``); what was done, one line each. Raises the first
    DamagedRecord that cannot be mended, before anything is changed: damage of its own kind that cannot be rebuilt, a
    study journal that would still miss trials once its cut record is dropped (a cut longer than one record), or
    records that do not agree on the trials."""
    folder = Path(folder)
    found = [*(e for e in (damage_of(read_record, folder / n) for n in RECORDS) if e),
             *(e for e in [damage_of(check_journal, folder / STUDY_FILE)] if e), *check_tune_state(folder),
             *check_best(folder)]
    fatal = [d for d in found if not d.repairable]
    if fatal:
        raise fatal[0]
    journal = folder / STUDY_FILE
    if any(d.path == journal for d in found):
        data, lines = journal_lines(journal)
        with tempfile.TemporaryDirectory() as tmp:  # the journal as the repair would leave it, checked first
            mended = Path(tmp) / Path(STUDY_FILE).name
            mended.write_bytes(data[:len(data) - len(lines[-1])])
            disagree = check_agreement(folder, journal=mended)
    else:
        disagree = check_agreement(folder)
    disagree = [d for d in disagree if d.repair != RETELL]  # told again by the resume (search.searcher.mend_study)
    if disagree:
        raise disagree[0]
    done = []
    for d in found:
        rel = d.path.relative_to(folder).as_posix()
        if d.path == journal:
            done.append(f"{STUDY_FILE}: dropped a cut last record ({repair_journal(d.path)} bytes)")
        elif d.path.match(SEARCHER_STATE):
            order = scheduler_record(folder / SCHEDULER_FILE).get("order") or []
            write_json(d.path, {"study": STUDY_FILE, "asked": list(order)})
            done.append(f"{rel}: made again from the scheduler's order of the {len(order)} trials proposed")
        elif d.path == folder / BEST_DIR:
            shutil.rmtree(d.path)  # the search is then finished again by the resume: the same export, made again
            done.append(f"{BEST_DIR}/: removed ({d.why}); "
                        "the winner is exported again from its checkpoint")
        elif d.path.name == TRIAL_PARAMS:
            config = next(t["config"] for t in tune_trials(folder) if t["dir"] == d.path.parent)
            write_json(d.path, config)
            done.append(f"{rel}: written again from Tune's experiment state")
        else:
            os.remove(d.path)
            done.append(f"{rel}: removed; {d.repair}")
    return done
