"""Dataset fingerprint: what the planner needs to know about the data, and nothing else.

Per case: spacing, shape, shape after cropping to the non-zero region. Per channel:
intensity statistics of foreground voxels (label > 0), from a bounded sample — nnU-Net draws
1e8 / n_cases voxels per case with replacement, seed 1234 — so memory stays flat however
large the dataset. Axes are medpipe's (i, j, k) array axes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medpipe.data.layout import Case, load_dataset
from medpipe.data.verify import read_checked_case
from medpipe.errors import MedpipeError
from medpipe.io import write_json
from medpipe.parallel import map_cases
from medpipe.preprocessing.resampling import crop_to_nonzero

FOREGROUND_SAMPLES_TOTAL = 10e7  # nnU-Net: num_foreground_voxels_for_intensitystats
SAMPLE_SEED = 1234


def fingerprint_case(case: Case, n_samples: int, label_values: frozenset[int]) -> dict:
    """Spacing, shapes and a foreground intensity sample of one training case (its files
    checked first, as `verify` checks them)."""
    images, label, geometry = read_checked_case(case, label_values)
    cropped = crop_to_nonzero(images, label)
    foreground = cropped.label > 0
    rng = np.random.RandomState(SAMPLE_SEED)
    samples = []
    for channel in cropped.images:
        voxels = channel[foreground]
        samples.append(rng.choice(voxels, n_samples, replace=True) if voxels.size else voxels)
    return {
        "case_id": case.case_id,
        "spacing": list(geometry.spacing),
        "shape": list(images.shape[1:]),
        "shape_after_crop": list(cropped.images.shape[1:]),
        "relative_size_after_crop": float(
            np.prod(cropped.images.shape[1:]) / np.prod(images.shape[1:])
        ),
        "samples": samples,
    }


def fingerprint_dataset(
    dataset_dir: str | Path,
    workers: int = 1,
    on_case_done: Callable[[str], None] | None = None,
) -> dict:
    """Fingerprint every training case (in parallel when `workers` > 1)."""
    dataset = load_dataset(dataset_dir)
    cases = list(dataset.training)
    n_samples = int(FOREGROUND_SAMPLES_TOTAL // len(cases))
    done = (lambda case: on_case_done(case.case_id)) if on_case_done else None
    results = list(map_cases(fingerprint_case, cases, n_samples, dataset.spec.label_values,
                             workers=workers, on_done=done))

    channels = {}
    for index, name in dataset.spec.channel_names.items():
        values = np.concatenate([r["samples"][int(index)] for r in results])
        channels[index] = _intensity_statistics(values) | {"name": name}
    spacings = np.array([r["spacing"] for r in results])
    shapes = np.array([r["shape_after_crop"] for r in results])
    return {
        "dataset": str(Path(dataset_dir)),
        "dataset_json": dataset.spec.model_dump(by_alias=True, exclude_none=True),
        "axes": "array axes (i, j, k) of the images as read; spacing in mm",
        "cases": [{k: v for k, v in r.items() if k != "samples"} for r in results],
        "foreground_intensity_properties_per_channel": channels,
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_shape_after_crop": np.median(shapes, axis=0).tolist(),
        "median_relative_size_after_cropping": float(
            np.median([r["relative_size_after_crop"] for r in results])
        ),
        "data_hash": _data_hash(dataset.training),
    }


def write_fingerprint(fingerprint: dict, path: str | Path) -> Path:
    return write_json(fingerprint, path, finite=True)


FINGERPRINT_KEYS = ("dataset_json", "cases", "foreground_intensity_properties_per_channel",
                    "median_relative_size_after_cropping", "data_hash")


def read_fingerprint(path: str | Path) -> dict:
    """fingerprint.json as `fingerprint_dataset` wrote it; anything else (unreadable, keys
    missing, a spacing or shape that is not positive) is refused naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedpipeError(f"cannot read fingerprint ({error}); `medpipe fingerprint` "
                           "writes it", path) from None
    missing = [k for k in FINGERPRINT_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise MedpipeError(f"not a medpipe fingerprint: missing {', '.join(missing)}", path)
    try:
        for case in data["cases"]:
            values = [float(v) for v in (*case["spacing"], *case["shape_after_crop"])]
            if len(values) != 6 or not all(np.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"case {case.get('case_id')!r}: spacing and shape must be "
                                 "three positive numbers each")
    except (KeyError, TypeError, ValueError) as error:
        raise MedpipeError(f"broken fingerprint ({error})", path) from None
    if not data["cases"]:
        raise MedpipeError("broken fingerprint (no cases)", path)
    return data


def _intensity_statistics(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        nan = float("nan")
        return dict.fromkeys(
            ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5"), nan
        )
    low, median, high = np.percentile(values, (0.5, 50.0, 99.5))
    return {
        "mean": float(np.mean(values)),
        "median": float(median),
        "std": float(np.std(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "percentile_99_5": float(high),
        "percentile_00_5": float(low),
    }


def _data_hash(cases: tuple[Case, ...]) -> str:
    """Content hash of the training files: tags runs with exactly the data they saw."""
    digest = hashlib.sha256()
    for case in cases:
        for path in (*case.images, case.label):
            if path is not None:
                digest.update(path.name.encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
