"""Errors a user can act on.

Every expected failure is a :class:`RetrainerError` with a one-line message and an optional
hint saying what to do next. The CLI prints them without a traceback; library users catch them.
"""
from __future__ import annotations


class RetrainerError(Exception):
    """An expected failure: bad input, missing weights, an unusable folder."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class UnknownBackbone(RetrainerError):
    """A backbone name that is not in the registry."""


class WeightsUnavailable(RetrainerError):
    """Pretrained weights could not be loaded or downloaded."""


class DatasetError(RetrainerError):
    """The image folder (or database) cannot be used for training."""


class ImageError(RetrainerError):
    """One image could not be read or decoded; ``reason`` says why, without the name."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class CacheError(RetrainerError):
    """The bottleneck cache lost entries this run needs, or cannot be read."""


class FolderNotWritable(RetrainerError):
    """A folder that must be written (output, cache) cannot be created or written to."""

    def __init__(self, path: object, what: str, reason: str, hint: str | None = None) -> None:
        super().__init__(f"cannot write to the {what} '{path}' ({reason}).",
                         hint or "Choose a folder you can write to, or give it to your user "
                                 "(chown/chmod).")
        self.path = str(path)


class ModelDirError(RetrainerError):
    """An export folder is missing files or is inconsistent."""


class AccuracyGateFailed(RetrainerError):
    """The trained model is below ``assert_accuracy_at_least``; nothing was exported."""

    exit_code = 3
