"""Errors that ftflow reports to users as one clear message, never a traceback."""

from __future__ import annotations


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


class StageError(FtflowError):
    """A job failed for a reason tied to one experiment and stage."""

    def __init__(self, experiment: str, stage: str | None, message: str):
        self.experiment = experiment
        self.stage = stage
        where = f"experiment {experiment!r}" + (f", stage {stage!r}" if stage else "")
        super().__init__(f"{where}: {message}")
