"""Exceptions. A ``UserError`` is bad input: the CLIs print its one line and exit 2."""


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
