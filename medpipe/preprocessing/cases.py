"""Preprocessing whole cases — crop, normalise, resample in nnU-Net's order — the exact way
back to the raw grid, and the preprocessed-case files every later stage reads.

The same functions run at training time (`preprocess_dataset`) and at inference time
(`preprocess_images` + `restore_label_from_probabilities`), so a model always sees data
prepared one way. Arrays are channel-first (C, i, j, k) in medpipe's array axes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpipe.data.labels import REGION_THRESHOLD, LabelScheme
from medpipe.data.layout import Case
from medpipe.data.verify import read_checked_case
from medpipe.errors import DatasetError
from medpipe.io import Geometry, Volume, atomic_output
from medpipe.parallel import map_cases
from medpipe.planning.plans import IntensityProperties, Plans
from medpipe.preprocessing.properties import CaseProperties, read_properties, write_properties
from medpipe.preprocessing.resampling import (
    Cropped,
    coarse_axis,
    crop_to_nonzero,
    new_shape_for,
    normalise,
    resample_images,
    resample_label,
    resize,
)

CLASS_LOCATION_SAMPLES = 10000  # per class, for foreground oversampling
CLASS_LOCATION_SEED = 1234


@dataclass(frozen=True)
class PreprocessingPlan:
    """The part of a plans configuration that preprocessing needs."""

    spacing: tuple[float, float, float]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: dict[str, IntensityProperties]

    @classmethod
    def from_plans(cls, plans: Plans, configuration: str = "3d_fullres") -> PreprocessingPlan:
        config = plans.configuration(configuration)
        return cls(
            spacing=config.spacing,
            normalization_schemes=config.normalization_schemes,
            use_mask_for_norm=config.use_mask_for_norm,
            intensity_properties=plans.foreground_intensity_properties_per_channel,
        )


def crop_and_normalise(images: np.ndarray, plan: PreprocessingPlan,
                       label: np.ndarray | None = None) -> tuple[Cropped, np.ndarray]:
    """nnU-Net's first two steps on one case (C, X, Y, Z): the crop to the non-zero region
    and the normalised channels of that crop, still on the raw spacing (a registration
    network's inputs are resampled from here straight to its own grid)."""
    cropped = crop_to_nonzero(images, label)
    data = normalise(cropped.images, cropped.mask, plan.normalization_schemes,
                     plan.use_mask_for_norm, plan.intensity_properties)
    return cropped, data


def preprocess_images(
    images: np.ndarray,
    geometry: Geometry,
    plan: PreprocessingPlan,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalise, resample one case; return data, label and the properties to undo it."""
    cropped, data = crop_and_normalise(images, plan, label)
    shape_after_crop = tuple(data.shape[1:])
    target_shape = new_shape_for(shape_after_crop, geometry.spacing, plan.spacing)
    axis = coarse_axis(geometry.spacing, plan.spacing)
    data = resample_images(data, target_shape, axis)
    resampled_label = (
        resample_label(cropped.label, target_shape, axis) if cropped.label is not None else None
    )
    properties = CaseProperties(
        geometry=geometry,
        shape_before_cropping=tuple(images.shape[1:]),
        bbox_used_for_cropping=cropped.bbox,
        shape_after_cropping_and_before_resampling=shape_after_crop,
        spacing_before_resampling=tuple(geometry.spacing),
        spacing=tuple(plan.spacing),
        shape_after_resampling=tuple(target_shape),
        separate_axis=axis,
    )
    return data, resampled_label, properties


def restore_label(label: np.ndarray, properties: CaseProperties) -> Volume:
    """Map a label array in preprocessed space back onto the raw image's exact grid."""
    restored = resample_label(label, properties.shape_after_cropping_and_before_resampling,
                              properties.separate_axis)
    return _uncrop(restored, properties)


def restore_label_from_probabilities(probabilities: np.ndarray, properties: CaseProperties,
                                     labels: LabelScheme | None = None) -> Volume:
    """Labels on the raw grid from class probabilities (K, X, Y, Z) in preprocessed space
    (or, for a region-based LABELS scheme, from region probabilities, each thresholded on the
    raw grid and written in `regions_class_order`).

    As nnU-Net exports predictions: the probabilities are resampled (linearly, the coarse
    axis by nearest neighbour) and the argmax taken on the raw grid, which keeps thin
    structures that resampling a hard label map would lose. One class at a time inside the
    crop box (a running maximum; ties go to the lower label, as `argmax`), so the K maps on
    the full grid are never held at once: with 100 classes a 512x512x300 CT would need 31 GB
    for them.
    """
    if labels is not None and labels.regions:
        masks = [resized > REGION_THRESHOLD
                 for resized in _cropped_probability_maps(probabilities, properties)]
        return _uncrop(labels.labels_from_regions(masks), properties)
    label = best = None
    for k, resized in enumerate(_cropped_probability_maps(probabilities, properties)):
        if label is None:
            label = np.zeros(resized.shape, np.uint8 if len(probabilities) < 256 else np.int16)
            best = resized
            continue
        better = resized > best
        label[better] = k
        np.maximum(best, resized, out=best)
    return _uncrop(label, properties)  # outside the crop box the scan was empty: background


def restore_probability_maps(probabilities: np.ndarray, properties: CaseProperties,
                             background: bool = True) -> Volume:
    """Class probabilities on the raw grid, as a vector volume (X, Y, Z, K); outside the
    crop box the scan was empty, so background (the first channel, unless BACKGROUND is
    False as for region probabilities) has probability 1 there."""
    full = np.zeros((*properties.shape_before_cropping, len(probabilities)), np.float32)
    if background:
        full[..., 0] = 1.0
    slicer = properties.crop_slices
    for k, resized in enumerate(_cropped_probability_maps(probabilities, properties)):
        full[(*slicer, k)] = resized  # into place, one class at a time: no stacked copy
    return Volume(full, properties.geometry)


def _cropped_probability_maps(probabilities: np.ndarray,
                              properties: CaseProperties) -> Iterator[np.ndarray]:
    """Each class's probabilities resampled onto the raw grid's crop box, one at a time."""
    shape = properties.shape_after_cropping_and_before_resampling
    for channel in probabilities:
        yield resize(channel.astype(np.float32), shape, 1, properties.separate_axis)


def _uncrop(label: np.ndarray, properties: CaseProperties) -> Volume:
    full = np.zeros(properties.shape_before_cropping, dtype=label.dtype)
    full[properties.crop_slices] = label
    return Volume(full, properties.geometry)


def class_locations(label: np.ndarray, classes: Sequence[int]) -> dict[int, np.ndarray]:
    """Up to 10,000 voxel positions per foreground class, so sampling needs no full scan."""
    rng = np.random.RandomState(CLASS_LOCATION_SEED)
    found = {}
    for value in classes:
        positions = np.argwhere(label == value)
        if len(positions) > CLASS_LOCATION_SAMPLES:
            positions = positions[rng.choice(len(positions), CLASS_LOCATION_SAMPLES, replace=False)]
        found[int(value)] = positions
    return found


# --------------------------------------------------------------------------- the files


def case_files(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    """(arrays, properties) of a preprocessed case: `CASE.npz` and `CASE.json`."""
    return out_dir / f"{case_id}.npz", out_dir / f"{case_id}.json"


def preprocess_case(case: Case, plan: PreprocessingPlan, out_dir: Path, classes: Sequence[int]):
    """Preprocess one case to OUT/<case>.npz + OUT/<case>.json (written last, atomically);
    its files are checked first (`read_checked_case`: CLASSES and 0 are the label values)."""
    images, label, geometry = read_checked_case(case, frozenset({0, *classes}))
    data, seg, properties = preprocess_images(images, geometry, plan, label)
    properties = properties.with_case(
        case.case_id, class_locations(seg, classes) if seg is not None else None)
    arrays = {"data": data}
    if seg is not None:
        arrays["seg"] = seg.astype(np.int16 if seg.max() > 127 else np.int8)[None]
    arrays_file, properties_file = case_files(out_dir, case.case_id)
    with atomic_output(arrays_file) as staging:
        np.savez(staging, **arrays)
    write_properties(properties, properties_file)
    return case.case_id


def is_preprocessed(out_dir: Path, case_id: str) -> bool:
    """A case is done when its properties file (written after the arrays) is complete."""
    arrays_file, properties_file = case_files(out_dir, case_id)
    if not (properties_file.is_file() and arrays_file.is_file()):
        return False
    try:
        read_properties(properties_file)
    except DatasetError:
        return False
    return True


def preprocess_dataset(
    cases: Sequence[Case],
    plan: PreprocessingPlan,
    out_dir: str | Path,
    classes: Sequence[int],
    workers: int = 1,
    on_case_done: Callable[[str], None] | None = None,
) -> list[str]:
    """Preprocess the cases not yet done; returns the ids processed by this call."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if not is_preprocessed(out_dir, c.case_id)]
    done = (lambda case: on_case_done(case.case_id)) if on_case_done else None
    return list(
        map_cases(preprocess_case, todo, plan, out_dir, classes, workers=workers, on_done=done)
    )


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case in memory: what training, evaluation and registration read."""

    case_id: str
    data: np.ndarray  # (C, X, Y, Z) float32, normalised
    seg: np.ndarray | None  # (X, Y, Z) integer labels, None for a case without labels
    properties: CaseProperties


def load_preprocessed(out_dir: str | Path, case_id: str) -> PreprocessedCase:
    """A case written by `preprocess_case`; a missing one says which command makes it."""
    arrays_file, properties_file = case_files(Path(out_dir), case_id)
    if not (arrays_file.is_file() and properties_file.is_file()):
        raise DatasetError("case is not preprocessed (run `medpipe preprocess`)", arrays_file)
    properties = read_properties(properties_file)
    with np.load(arrays_file) as arrays:
        data = arrays["data"]
        seg = arrays["seg"][0] if "seg" in arrays else None
    return PreprocessedCase(case_id, data, seg, properties)


def load_labelled_cases(out_dir: str | Path, case_ids: Sequence[str]) -> list[PreprocessedCase]:
    """Cases with labels, read once into memory: preprocessing is never repeated while
    training."""
    cases = [load_preprocessed(out_dir, case_id) for case_id in case_ids]
    for case in cases:
        if case.seg is None:
            raise DatasetError("preprocessed case has no label",
                               case_files(Path(out_dir), case.case_id)[0])
    return cases
