"""Errors that ftflow reports to users as one clear message, never a traceback."""

from __future__ import annotations

import contextlib
from typing import Iterator


class FtflowError(Exception):
    """A failure the user can fix; the message says where and how."""


class ConfigError(FtflowError):
    """The config is invalid. The message starts with the config path at fault."""

    def __init__(self, path: str, message: str, fix: str | None = None):
        self.path = path
        self.message = message
        self.fix = fix
        text = f"{path}: {message}" if path else message
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class RowError(Exception):
    """One row that cannot be used: dropped and counted by `reason` (a key of data.DROP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StageError(FtflowError):
    """A job failed for a reason tied to one experiment and stage."""

    def __init__(self, experiment: str, stage: str | None, message: str):
        self.experiment = experiment
        self.stage = stage
        where = f"experiment {experiment!r}" + (f", stage {stage!r}" if stage else "")
        super().__init__(f"{where}: {message}")


@contextlib.contextmanager
def in_stage(experiment: str, stage: str | None) -> Iterator[None]:
    """Name the experiment and stage in any FtflowError raised inside (e.g. no room on the disk)."""
    try:
        yield
    except StageError:
        raise
    except FtflowError as e:
        raise StageError(experiment, stage, str(e)) from None


ERROR_LINE_CHARS = 300  # a recorded reason quotes at most this much of an error


def error_line(err: BaseException) -> str:
    """The one line that says why a job failed: an FtflowError's own message (it names where and how),
    else the exception's type and the first line of its message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, FtflowError) and lines:
        return lines[0][:ERROR_LINE_CHARS]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text[:ERROR_LINE_CHARS]
