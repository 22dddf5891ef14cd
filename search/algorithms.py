"""Kept for searches started before ``search.callbacks`` had its name: Tune unpickles their callbacks from here."""
from search.callbacks import SearchStateCallback, WallClock, trial_dirname, update_wall  # noqa: F401
