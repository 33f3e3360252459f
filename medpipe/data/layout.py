"""The nnU-Net v2 raw dataset layout.

    DATASET/
      dataset.json          channel_names, labels, numTraining, file_ending
      imagesTr/CASE_0000{file_ending}   one file per channel, 4-digit channel index
      labelsTr/CASE{file_ending}
      imagesTs/CASE_0000{file_ending}   optional, unlabelled test cases
      labelsTs/CASE{file_ending}        optional, their reference labels
      imagesTrUnlabelled/CASE_0000{file_ending}   optional (medpipe's own addition), training
                                        scans without labels: registration networks learn
                                        from them too (their loss needs no labels); segmentation
                                        and the splits ignore them

`scan_cases` is lenient and returns the problems it found next to the cases, so that
`medpipe verify` can list everything at once; `load_dataset` is strict and raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpipe.data.problems import Problem, Severity
from medpipe.errors import DatasetError
from medpipe.io import SUPPORTED_SUFFIXES, Geometry, read_image

DATASET_JSON = "dataset.json"
UNLABELLED_DIR = "imagesTrUnlabelled"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetSpec(BaseModel):
    """dataset.json, validated once; nnU-Net's own keys keep nnU-Net's names."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    num_training: int = Field(alias="numTraining", ge=0)
    file_ending: str
    regions_class_order: list[int] | None = None
    name: str | None = None

    @field_validator("channel_names")
    @classmethod
    def _channels_are_numbered(cls, value: dict[str, str]) -> dict[str, str]:
        expected = [str(i) for i in range(len(value))]
        if sorted(value, key=lambda k: int(k) if k.isdigit() else -1) != expected:
            raise ValueError(f"keys must be '0'..'{len(value) - 1}', got {sorted(value)}")
        if not value:
            raise ValueError("at least one channel is needed")
        return value

    @field_validator("file_ending")
    @classmethod
    def _ending_is_suffix(cls, value: str) -> str:
        # one of the formats medpipe reads, nothing else: every path is built as
        # FOLDER/CASE + file_ending, so an ending like '/../../x' would leave the folder
        if value not in SUPPORTED_SUFFIXES:
            raise ValueError(f"must be one of {', '.join(SUPPORTED_SUFFIXES)}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _labels_are_valid(self) -> DatasetSpec:
        values = self.label_values
        if any(v < 0 for v in values):
            raise ValueError(f"labels must be non-negative integers, got {sorted(values)}")
        if self.labels.get("background") != 0:
            raise ValueError("labels must declare 'background': 0")
        regions = any(isinstance(v, list) for v in self.labels.values())
        if regions and not self.regions_class_order:
            raise ValueError("region-based labels (lists) need 'regions_class_order'")
        if not regions and sorted(values) != list(range(len(values))):
            # nnU-Net's rule too: a network's outputs are the classes 0..K-1
            raise ValueError(f"label values must be consecutive 0..{len(values) - 1}, got "
                             f"{sorted(values)}; renumber the label maps and dataset.json")
        return self

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> frozenset[int]:
        """Every integer a label map may contain (regions contribute each member)."""
        values: set[int] = set()
        for value in self.labels.values():
            values.update(value if isinstance(value, list) else [value])
        return frozenset(values)


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one per channel, in channel order
    label: Path | None


@dataclass(frozen=True)
class RawDataset:
    root: Path
    spec: DatasetSpec
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    unlabelled: tuple[Case, ...] = ()  # UNLABELLED_DIR: training scans without labels

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.training]

    @property
    def labelled_test_ids(self) -> list[str]:
        """The test cases with a reference label (imagesTs with labelsTs), sorted."""
        return sorted(case.case_id for case in self.test if case.label is not None)

    def case(self, case_id: str) -> Case:
        for case in self.training + self.test + self.unlabelled:
            if case.case_id == case_id:
                return case
        raise DatasetError(f"no case {case_id!r}", self.root)


def read_spec(root: Path) -> DatasetSpec:
    """Parse and validate ROOT/dataset.json, with an error that names the bad field."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise DatasetError("missing (every dataset needs a dataset.json)", path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"not valid JSON ({error})", path) from error
    if isinstance(raw, dict) and "modality" in raw and "channel_names" not in raw:
        raise DatasetError(
            "this is an nnU-Net v1 / Decathlon dataset.json ('modality', 'training'); "
            "medpipe reads the nnU-Net v2 layout (channel_names, file_ending, a file per channel)",
            path,
        )
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in error.errors()
        )
        raise DatasetError(f"invalid ({details})", path) from error


def scan_cases(
    root: Path, spec: DatasetSpec, images_dir: str, labels_dir: str | None, require_labels: bool
) -> tuple[list[Case], list[Problem]]:
    """Pair channel files and label files by case id (LABELS_DIR None: images alone);
    report what does not pair up."""
    root = Path(root)
    channels, problems = _channel_files(root / images_dir, spec.file_ending)
    labels: dict[str, Path] = {}
    for path in _entries(root / labels_dir) if labels_dir else []:
        stem = _stem(path, spec.file_ending)
        if stem is None:
            problems.append(_misnamed(path, spec.file_ending, channel_file=False))
        else:
            labels[stem] = path

    cases = []
    for case_id in sorted(channels):
        found = channels[case_id]
        missing = [c for c in range(spec.num_channels) if c not in found]
        extra = sorted(c for c in found if c >= spec.num_channels)
        folder = root / images_dir
        for channel in missing:
            problems.append(
                Problem(
                    "missing_channel",
                    folder / f"{case_id}_{channel:04d}{spec.file_ending}",
                    f"channel {channel} of {spec.num_channels} is missing "
                    f"(dataset.json declares {spec.num_channels} channel(s))",
                    case_id=case_id,
                )
            )
        for channel in extra:
            problems.append(
                Problem(
                    "unexpected_channel",
                    found[channel],
                    f"channel {channel} is not declared in dataset.json channel_names "
                    f"(declares {spec.num_channels})",
                    case_id=case_id,
                )
            )
        label = labels.get(case_id)
        if label is None and require_labels:
            problems.append(
                Problem(
                    "image_without_label",
                    folder / f"{case_id}_0000{spec.file_ending}",
                    f"no label {labels_dir}/{case_id}{spec.file_ending} for this image",
                    case_id=case_id,
                )
            )
        if missing or (label is None and require_labels):
            continue
        images = tuple(found[c] for c in range(spec.num_channels))
        cases.append(Case(case_id, images, label))

    for case_id in sorted(set(labels) - set(channels)):
        problems.append(
            Problem(
                "label_without_image",
                labels[case_id],
                f"no image {images_dir}/{case_id}_0000{spec.file_ending} for this label",
                case_id=case_id,
            )
        )
    return cases, problems


def scan_dataset(
    root: str | Path, spec: DatasetSpec | None = None
) -> tuple[RawDataset, list[Problem]]:
    """Read dataset.json (unless `spec` stands in for it) and pair up files.

    Layout problems are returned, not raised. A negative `num_training` in a stand-in spec
    means "unknown" and skips that check.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("not a folder", root)
    spec = spec or read_spec(root)
    problems: list[Problem] = []
    if not (root / "imagesTr").is_dir():
        problems.append(Problem("missing_folder", root / "imagesTr", "imagesTr/ is missing"))
    training, found = scan_cases(root, spec, "imagesTr", "labelsTr", require_labels=True)
    problems += found
    test, found = scan_cases(root, spec, "imagesTs", "labelsTs", require_labels=False)
    problems += found
    unlabelled, found = scan_cases(root, spec, UNLABELLED_DIR, None, require_labels=False)
    problems += found
    labelled_ids = {case.case_id for case in training + test}
    for case in unlabelled:
        if case.case_id in labelled_ids:
            problems.append(Problem(
                "duplicate_case", case.images[0],
                f"case id {case.case_id!r} is also in imagesTr or imagesTs: ids must be unique "
                "(the preprocessed cases share one folder)", case_id=case.case_id))
    unlabelled = [case for case in unlabelled if case.case_id not in labelled_ids]
    n_found = len(_channel_files(root / "imagesTr", spec.file_ending)[0])
    if spec.num_training >= 0 and spec.num_training != n_found:
        problems.append(
            Problem(
                "num_training_mismatch",
                root / DATASET_JSON,
                f"numTraining is {spec.num_training} but imagesTr holds {n_found} case(s)",
            )
        )
    return RawDataset(root, spec, tuple(training), tuple(test), tuple(unlabelled)), problems


def load_dataset(root: str | Path) -> RawDataset:
    """The dataset, or a DatasetError listing every layout problem."""
    dataset, problems = scan_dataset(root)
    errors = [p for p in problems if p.severity is Severity.ERROR]
    if errors:
        listing = "\n".join(f"  {p.file}: {p.message}" for p in errors)
        raise DatasetError(f"{len(errors)} layout problem(s):\n{listing}", dataset.root)
    return dataset


def _channel_files(
    folder: Path, file_ending: str
) -> tuple[dict[str, dict[int, Path]], list[Problem]]:
    """Channel files of an images folder by case id, and the files that are misnamed."""
    channels: dict[str, dict[int, Path]] = {}
    problems = []
    for path in _entries(folder):
        stem = _stem(path, file_ending)
        match = _CHANNEL_FILE.match(stem) if stem is not None else None
        if match is None:
            problems.append(_misnamed(path, file_ending, channel_file=True))
        else:
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
    return channels, problems


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _stem(path: Path, file_ending: str) -> str | None:
    if not path.name.endswith(file_ending) or len(path.name) == len(file_ending):
        return None
    return path.name[: -len(file_ending)]


def _misnamed(path: Path, file_ending: str, channel_file: bool) -> Problem:
    pattern = f"CASE_XXXX{file_ending}" if channel_file else f"CASE{file_ending}"
    return Problem(
        "unexpected_file",
        path,
        f"does not match the layout's naming {pattern} (file_ending from dataset.json); ignored",
        severity=Severity.WARNING,
    )


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Channels stacked (C, i, j, k) as float32, the label as int16 (or None), the grid."""
    volumes = [read_image(path) for path in case.images]
    geometry = volumes[0].geometry
    images = np.stack([v.array for v in volumes]).astype(np.float32)
    label = read_image(case.label).array.astype(np.int16) if case.label is not None else None
    return images, label, geometry
