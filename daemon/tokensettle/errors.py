"""Exit codes and the errors that end a command with one line for the user.

Kept apart from `config` (pydantic) so that the command line can name them without
importing anything heavy: `tokensettle --version` should not load the settings model.
"""

from __future__ import annotations

#: Stable, scripts rely on them (README: "Exit codes").
EXIT_OK = 0
EXIT_RUNS_FAILED = 1  # some runs failed, a run asked for does not exist, a doctor check failed
EXIT_USAGE = 2  # a usage or configuration error: nothing was done
EXIT_AUTH = 3  # the admin key was refused or lacks api.usage.read: nothing was written


class ConfigError(Exception):
    """A setting has a bad value. `str()` is one line naming the setting."""


class CommandError(Exception):
    """A command cannot go on. `str()` is one line naming the path or value and what to
    do; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
