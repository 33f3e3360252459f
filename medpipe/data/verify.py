"""Dataset integrity check: every problem at once, each naming its file, nothing modified.

A dataset is read, never written: files are opened read-only and the report goes elsewhere.
When dataset.json itself is broken the check still pairs files by the suffix they share, so
one run shows the broken JSON *and* the NaN image *and* the corrupted label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpipe.data.layout import DATASET_JSON, Case, DatasetSpec, read_spec, scan_dataset
from medpipe.data.problems import Problem, Severity
from medpipe.errors import DatasetError, MedpipeError
from medpipe.io import SUPPORTED_SUFFIXES, Volume, image_suffix, read_image, write_json
from medpipe.parallel import map_cases

DEFAULT_TOLERANCE = 1e-4  # mm and direction cosines; NIfTI stores geometry as float32


@dataclass(frozen=True)
class CheckSettings:
    num_channels: int
    label_values: frozenset[int] | None  # None: dataset.json unreadable, values unknown
    tolerance: float = DEFAULT_TOLERANCE


@dataclass
class VerificationReport:
    root: Path
    n_training: int = 0
    n_test: int = 0
    n_unlabelled: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, object]:
        return {
            "dataset": str(self.root),
            "ok": self.ok,
            "n_training_cases": self.n_training,
            "n_test_cases": self.n_test,
            "n_unlabelled_cases": self.n_unlabelled,
            "n_errors": len(self.errors),
            "n_warnings": len(self.problems) - len(self.errors),
            "problems": [p.to_json() for p in self.problems],
        }


def verify_dataset(
    root: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    workers: int = 1,
    on_case_checked: Callable[[str], None] | None = None,
) -> VerificationReport:
    """Check layout, dataset.json and every case's files; return all problems found."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("not a folder", root)
    report = VerificationReport(root)
    try:
        read_spec(root)
        labels_known = True
    except DatasetError as error:
        report.problems.append(Problem("dataset_json", root / DATASET_JSON, error.reason))
        labels_known = False
    dataset, layout_problems = scan_dataset(root, spec=None if labels_known else _guess_spec(root))
    report.problems += layout_problems
    report.n_training, report.n_test = len(dataset.training), len(dataset.test)
    report.n_unlabelled = len(dataset.unlabelled)
    settings = CheckSettings(
        num_channels=dataset.spec.num_channels,
        label_values=dataset.spec.label_values if labels_known else None,
        tolerance=tolerance,
    )
    cases = list(dataset.training + dataset.test + dataset.unlabelled)
    done = (lambda case: on_case_checked(case.case_id)) if on_case_checked else None
    for found in map_cases(check_case, cases, settings, workers=workers, on_done=done):
        report.problems += found
    return report


def check_case(case: Case, settings: CheckSettings) -> list[Problem]:
    """Read every file of one case and check voxels, labels and that all share one grid."""
    problems: list[Problem] = []
    images = {path: volume for path in case.images
              if (volume := _read(path, case.case_id, problems)) is not None}
    label = _read(case.label, case.case_id, problems) if case.label is not None else None
    return problems + voxel_problems(case, images, label, settings.label_values,
                                     settings.tolerance)


def voxel_problems(case: Case, images: dict[Path, Volume], label: Volume | None,
                   label_values: frozenset[int] | None, tolerance: float) -> list[Problem]:
    """What is wrong with one case's volumes as read: voxels, labels, one shared grid."""
    problems: list[Problem] = []
    for path, volume in images.items():
        problems += check_image_voxels(volume, path, case.case_id)
    volumes = dict(images)
    if label is not None:
        problems += check_label_voxels(label, case.label, case.case_id, label_values)
        volumes[case.label] = label
    return problems + check_same_grid(volumes, case.case_id, tolerance)


def read_checked_case(case: Case, label_values: frozenset[int] | None,
                      tolerance: float = DEFAULT_TOLERANCE):
    """`read_case` for the stages that take a case in (fingerprint, preprocess): the same
    checks as `verify` on the voxels just read (finite, integer declared labels, every file
    on one grid), the first error raised naming its file, so no stage stretches a label
    map onto another grid or carries NaN into its outputs."""
    volumes = {path: read_image(path) for path in case.images}
    label = read_image(case.label) if case.label is not None else None
    errors = [p for p in voxel_problems(case, volumes, label, label_values, tolerance)
              if p.severity is Severity.ERROR]
    if errors:
        raise DatasetError(errors[0].message, errors[0].file)
    images = np.stack([volumes[path].array for path in case.images]).astype(np.float32)
    if not np.isfinite(images).all():
        raise DatasetError("voxel values beyond float32's range (+-3.4e38)", case.images[0])
    labels = label.array.astype(np.int16) if label is not None else None
    return images, labels, volumes[case.images[0]].geometry


def check_image_voxels(volume: Volume, path: Path, case_id: str) -> list[Problem]:
    array = volume.array
    if array.ndim != 3:
        return [_problem("not_3d", path, f"expected a 3D volume, got shape {array.shape}", case_id)]
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(array)))
            return [
                _problem(
                    "non_finite_voxels",
                    path,
                    f"{bad} of {array.size} voxels are not finite ({n_nan} NaN, {bad - n_nan} Inf)",
                    case_id,
                )
            ]
    if array.size and array.min() == array.max():
        return [
            _problem(
                "constant_image",
                path,
                f"every voxel is {array.flat[0]}",
                case_id,
                Severity.WARNING,
            )
        ]
    return []


def check_label_voxels(
    volume: Volume, path: Path, case_id: str, declared: frozenset[int] | None
) -> list[Problem]:
    array = volume.array
    if array.ndim != 3:
        message = f"expected a 3D label map, got shape {array.shape}"
        return [_problem("not_3d", path, message, case_id)]
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            return [_problem("non_finite_voxels", path, "label map holds NaN or Inf", case_id)]
        if not np.array_equal(array, np.round(array)):
            message = "label map holds non-integer values"
            return [_problem("label_not_integer", path, message, case_id)]
    values, counts = np.unique(array, return_counts=True)
    found = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    if declared is not None:
        undeclared = {v: c for v, c in found.items() if v not in declared}
        if undeclared:
            listing = ", ".join(f"{v} ({c} voxels)" for v, c in sorted(undeclared.items()))
            return [
                _problem(
                    "undeclared_label",
                    path,
                    f"label value(s) {listing} not declared in dataset.json labels "
                    f"{sorted(declared)}",
                    case_id,
                )
            ]
    if set(found) == {0}:
        message = "label map is all background"
        return [_problem("empty_label", path, message, case_id, Severity.WARNING)]
    return []


def check_same_grid(volumes: dict[Path, Volume], case_id: str, tolerance: float) -> list[Problem]:
    """Every channel and the label must lie on the first channel's grid."""
    grids = [(p, v) for p, v in volumes.items() if v.array.ndim == 3]
    if len(grids) < 2:
        return []
    reference_path, reference = grids[0]
    problems = []
    for path, volume in grids[1:]:
        if volume.shape != reference.shape:
            problems.append(
                _problem(
                    "shape_mismatch",
                    path,
                    f"shape {volume.shape} differs from {reference_path.name} {reference.shape}",
                    case_id,
                )
            )
            continue
        differences = volume.geometry.differences(reference.geometry, tolerance)
        if differences:
            problems.append(
                _problem(
                    "geometry_mismatch",
                    path,
                    f"grid differs from {reference_path.name} beyond {tolerance:g}: "
                    + "; ".join(differences),
                    case_id,
                )
            )
    return problems


def write_report(report: VerificationReport, path: str | Path) -> Path:
    return write_json(report.to_json(), path)


def _read(path: Path, case_id: str, problems: list[Problem]) -> Volume | None:
    try:
        return read_image(path)
    except MedpipeError as error:
        problems.append(_problem("unreadable", path, error.reason, case_id))
        return None


def _guess_spec(root: Path) -> DatasetSpec:
    """A stand-in for a broken dataset.json: the suffix and channel count the files show."""
    names = [p.name for p in (root / "imagesTr").glob("*") if not p.name.startswith(".")]
    suffixes = Counter(image_suffix(n) for n in names if image_suffix(n))
    ending = suffixes.most_common(1)[0][0] if suffixes else SUPPORTED_SUFFIXES[0]
    channels = {n[: -len(ending)][-4:] for n in names if n.endswith(ending)}
    n_channels = max((int(c) + 1 for c in channels if c.isdigit()), default=1)
    return DatasetSpec.model_construct(
        channel_names={str(i): f"channel{i}" for i in range(n_channels)},
        labels={"background": 0},
        num_training=-1,  # unknown: the broken dataset.json is reported already
        file_ending=ending,
    )


def _problem(
    check: str,
    path: Path,
    message: str,
    case_id: str,
    severity: Severity = Severity.ERROR,
) -> Problem:
    return Problem(check, path, message, severity, case_id)
