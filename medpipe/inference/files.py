"""Which files `medpipe predict` reads and writes: one scan, or a folder named the nnU-Net way
(`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... per channel in; `CASE.nii.gz` out)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from medpipe.errors import MedpipeError
from medpipe.io import image_suffix

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def plan_predictions(source: Path, target: Path, channels: int,
                     ) -> list[tuple[list[Path], Path]]:
    """(channel files, output file) per case; every problem is found before any is run."""
    jobs = _jobs(Path(source), Path(target), channels)
    inputs = {path.resolve() for files, _ in jobs for path in files}
    for _, output in jobs:
        if output.resolve() in inputs:
            raise MedpipeError("the prediction would overwrite an input scan; choose another "
                               "output", output)
    return jobs


def _jobs(source: Path, target: Path, channels: int) -> list[tuple[list[Path], Path]]:
    if not source.exists():
        raise MedpipeError("input not found", source)
    if source.is_file() or _is_dicom_folder(source):
        if channels != 1:
            raise MedpipeError(f"the model takes {channels} channels: give a folder of "
                               "CASE_0000, CASE_0001, ... files", source)
        if target.is_dir():
            raise MedpipeError("output is a folder; for one scan give a file name", target)
        return [([source], target)]
    cases: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(source.iterdir()):
        suffix = image_suffix(path)
        if not suffix:
            continue
        stem = path.name[: -len(suffix)]
        match = CHANNEL_FILE.match(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        cases[case][channel] = path
    if not cases:
        raise MedpipeError("no scans found (NIfTI, NRRD, MHA)", source)
    jobs = []
    for case, files in sorted(cases.items()):
        if sorted(files) != list(range(channels)):
            raise MedpipeError(f"case {case!r} has channels {sorted(files)}, the model takes "
                               f"{channels} (_0000 to _{channels - 1:04d})", source)
        suffix = image_suffix(files[0])
        jobs.append(([files[c] for c in range(channels)], target / f"{case}{suffix}"))
    return jobs


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def writes_dicom_seg(source: Path, target: Path, output_format: str) -> bool:
    """Whether the prediction of SOURCE goes to TARGET as a DICOM SEG: asked for
    ("dicom-seg"), or ("auto") a DICOM series in and a `.dcm` file name out."""
    source, target = Path(source), Path(target)
    wanted = output_format == "dicom-seg" or (
        output_format == "auto" and _is_dicom_folder(source) and target.suffix.lower() == ".dcm")
    if wanted and not _is_dicom_folder(source):
        raise MedpipeError("a DICOM SEG references its source images: the input must be a "
                           "DICOM series folder", source)
    if wanted and target.suffix.lower() != ".dcm":
        raise MedpipeError("a DICOM SEG is one file: give an output name ending in .dcm",
                           target)
    return wanted
