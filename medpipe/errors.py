"""Errors raised at the edges of medpipe.

Every error a user can cause (a bad file, a wrong layout, an unknown model) is a
`MedpipeError`. The CLI prints its message and exits non-zero without a traceback, so the
message must say which file is wrong and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class MedpipeError(Exception):
    """Base class of every error a user can act on.

    `path` names the file or folder at fault and `reason` says what is wrong with it; the
    message shown to the user is "PATH: REASON".
    """

    exit_code: int = 2

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.reason = reason
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class ImageReadError(MedpipeError):
    """A volume could not be read: missing, unreadable, truncated or of an unknown format."""


class ImageWriteError(MedpipeError):
    """A volume could not be written in the requested format."""


class GeometryError(MedpipeError):
    """A geometry cannot be represented (e.g. a sheared affine in an ITK image)."""


class DatasetError(MedpipeError):
    """The dataset folder or its dataset.json does not follow the expected layout."""


class VerificationFailed(MedpipeError):
    """`medpipe verify` found problems; the report lists each of them."""

    exit_code = 1
