"""Errors the CLI maps to exit codes: 2 for bad input or config, 1 for a diverged run or anything else, 128 +
the signal for a run stopped by a signal."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints the message (no traceback) and exits with code 2."""


class ConfigError(UserError):
    """A config key or value is wrong."""


class DataError(UserError):
    """A data file or row is wrong. The message names the file, the line and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}")
        self.path, self.line, self.field = path, line, field


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` optimizer steps in a row had a non-finite loss or gradient norm: the run stopped without
    writing a final model. The CLI prints the message (no traceback) and exits with code 1."""


class MismatchAlarm(TrainingDiverged):
    """With ``mismatch_strict=true``, the rollout engine's log-probs differed from the trainer's by more than
    ``mismatch_alarm`` in a step (stale engine weights, a precision gap): the run stopped without writing a final
    model. The CLI prints the message (no traceback) and exits with code 1."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C asked a run to stop: the step in progress was finished and a checkpoint written. The CLI
    exits with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class CheckpointError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount). The message says why and which checkpoint
    is still the newest complete one; the CLI prints it (no traceback) and exits with code 1."""
