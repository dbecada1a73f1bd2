"""Errors the CLI maps to exit codes: 2 for bad input or config, 1 for anything else."""


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
