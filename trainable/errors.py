"""Exceptions, and the one registry lookup. A ``UserError`` is bad input: the CLIs print its one line and exit 2."""
from __future__ import annotations

from typing import Any


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


def lookup(table: dict[str, Any], kind: str, name: str, error: type[Exception] = ValueError) -> Any:
    """``table[name]`` of a registry (tasks, models, generators, losses), or one line naming the choices."""
    if name not in table:
        raise error(f"unknown {kind} {name!r}; choose from {sorted(table)}")
    return table[name]
