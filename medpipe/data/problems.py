"""The vocabulary of dataset checks: one `Problem` per thing a user must fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path


class Severity(StrEnum):
    ERROR = "error"  # the pipeline would fail or learn from wrong data
    WARNING = "warning"  # suspicious, but usable


@dataclass(frozen=True)
class Problem:
    check: str  # short stable key, e.g. "nan_voxels", "geometry_mismatch"
    file: Path  # the file (or folder) to look at
    message: str
    severity: Severity = Severity.ERROR
    case_id: str | None = None

    def to_json(self) -> dict[str, str | None]:
        data = asdict(self)
        data["file"] = str(self.file)
        data["severity"] = str(self.severity)
        return data
