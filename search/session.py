"""The search record of a session: written when a search starts, marked at each resume (``akdtune/search.json``)."""
from __future__ import annotations

import time

from base import metrics as M
from base.layout import META_FILE
from results.moves import folders_of
from results.recordfile import write_record
from search.cluster import trials_at_once
from search.estimate import from_speed
from search.plan import SearchPlan
from search.prepare import Teacher


def record_session(plan: SearchPlan, teacher: Teacher, speed, started: float) -> None:
    """Write the search record (a new search) or mark this session's start in it (a resume). ``speed`` is the
    trials' ``trainable.speed.Speed``."""
    if plan.resume:  # this session's time adds to the earlier sessions'
        record = {**plan.record, "session_started": started, "wall_before": float(plan.record.get(M.WALL_S, 0.0)),
                  "folder": plan.path,  # where it is now (a copy or a move resumes in its own folder)
                  # the local folders its files were written in (a URI's working copies): paths Tune's pickles hold
                  "folders": [*(f for f in folders_of(plan.record) if f != plan.folder), plan.folder]}
    else:
        record = {**plan.record_fields(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "session_started": started,
                  "wall_before": 0.0, M.WALL_S: 0.0, "teacher_fingerprint": teacher.fingerprint,
                  "teacher_arch": teacher.arch, **teacher.accuracy, "speed": speed.record(),
                  M.SELECTED_ON: plan.selection_metric, "folder": plan.path, "folders": [plan.folder],
                  "trials_at_once": trials_at_once(plan),
                  # the expected wall time from the speed measurement's timing, beside the real wall_s
                  "estimate_s": from_speed(plan, speed)}
    write_record(plan.file(META_FILE), record)
