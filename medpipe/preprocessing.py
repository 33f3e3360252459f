"""Crop, normalise, resample — in nnU-Net's order — and the exact way back.

The same functions run at training time (`preprocess_dataset`) and at inference time
(`preprocess_images` + `restore_label`), so a model always sees data prepared one way.
Arrays are channel-first (C, i, j, k) in medpipe's array axes.

Resampling follows nnU-Net's default: 3rd-order spline for images, linear one-hot
interpolation for labels; when the spacing is anisotropic (ratio > 3) the in-plane axes are
resampled first and the coarse axis with nearest neighbour, so thick slices are not smeared
into each other. Coordinates map voxel centres the way `skimage.transform.resize` does,
here with `scipy.ndimage.zoom(grid_mode=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_fill_holes, zoom

from medpipe.data.layout import Case
from medpipe.errors import DatasetError
from medpipe.io import Geometry, Volume, atomic_output, read_image, write_json
from medpipe.parallel import map_cases

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
CLASS_LOCATION_SAMPLES = 10000  # per class, for foreground oversampling
CLASS_LOCATION_SEED = 1234


# --------------------------------------------------------------------------- reading


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Channels stacked (C, i, j, k) as float32, the label as int16 (or None), the grid."""
    volumes = [read_image(path) for path in case.images]
    geometry = volumes[0].geometry
    images = np.stack([v.array for v in volumes]).astype(np.float32)
    label = read_image(case.label).array.astype(np.int16) if case.label is not None else None
    return images, label, geometry


# --------------------------------------------------------------------------- cropping


@dataclass(frozen=True)
class Cropped:
    images: np.ndarray
    label: np.ndarray | None
    mask: np.ndarray  # non-zero region (holes filled), used for masked normalisation
    bbox: tuple[tuple[int, int], ...]  # [start, stop) per axis in the uncropped array


def crop_to_nonzero(images: np.ndarray, label: np.ndarray | None = None) -> Cropped:
    """Crop to the bounding box of voxels non-zero in any channel (holes filled, as nnU-Net)."""
    mask = binary_fill_holes(np.any(images != 0, axis=0))
    if not mask.any():
        bbox = tuple((0, n) for n in mask.shape)
    else:
        bbox = tuple((int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(mask))
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    return Cropped(
        images=images[(slice(None), *slicer)],
        label=label[slicer] if label is not None else None,
        mask=mask[slicer],
        bbox=bbox,
    )


# --------------------------------------------------------------------------- normalising


def normalise(
    images: np.ndarray,
    mask: np.ndarray,
    schemes: Sequence[str],
    use_mask: Sequence[bool],
    intensity_properties: dict[str, dict[str, float]],
) -> np.ndarray:
    """Per channel: CT clip + global z-score, or per-case z-score (optionally within mask)."""
    out = np.empty_like(images, dtype=np.float32)
    for c, (scheme, masked) in enumerate(zip(schemes, use_mask, strict=True)):
        image = images[c].astype(np.float32)
        if scheme == "CTNormalization":
            props = intensity_properties[str(c)]
            image = np.clip(image, props["percentile_00_5"], props["percentile_99_5"])
            out[c] = (image - props["mean"]) / max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            region = mask if masked else np.ones_like(mask)
            values = image[region]
            mean, std = (values.mean(), values.std()) if values.size else (0.0, 1.0)
            normalised = (image - mean) / max(std, 1e-8)
            out[c] = np.where(region, normalised, 0.0) if masked else normalised
        elif scheme == "RescaleTo01Normalization":
            low, high = image.min(), image.max()
            out[c] = (image - low) / max(high - low, 1e-8)
        elif scheme == "NoNormalization":
            out[c] = image
        else:
            raise DatasetError(f"unknown normalisation scheme {scheme!r}")
    return out


# --------------------------------------------------------------------------- resampling


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]):
    """nnU-Net's `compute_new_shape`: round(old_spacing / new_spacing * old_shape)."""
    return tuple(round(s / t * n) for n, s, t in zip(shape, spacing, target, strict=True))


def coarse_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The one axis to resample separately (nearest neighbour), or None if isotropic enough."""
    for candidate in (spacing, target):
        candidate = np.asarray(candidate, dtype=float)
        if candidate.max() / candidate.min() > ANISOTROPY_THRESHOLD:
            axes = np.flatnonzero(candidate == candidate.max())
            return int(axes[0]) if len(axes) == 1 else None
    return None


def resample_images(
    images: np.ndarray, new_shape: Sequence[int], separate_axis: int | None
) -> np.ndarray:
    """Cubic spline per channel, clipped to the input range (as skimage's resize does)."""
    out = np.empty((images.shape[0], *new_shape), dtype=np.float32)
    for c, image in enumerate(images):
        resized = _resize(image.astype(np.float64), new_shape, 3, separate_axis)
        out[c] = np.clip(resized, image.min(), image.max())
    return out


def resample_label(
    label: np.ndarray, new_shape: Sequence[int], separate_axis: int | None
) -> np.ndarray:
    """Linear interpolation of each class's one-hot map, then argmax: no new label values."""
    if tuple(label.shape) == tuple(new_shape):
        return label.copy()
    values = np.unique(label)
    best = np.full(tuple(new_shape), -1.0)
    out = np.zeros(tuple(new_shape), dtype=label.dtype)
    for value in values:
        score = _resize((label == value).astype(np.float32), new_shape, 1, separate_axis)
        better = score > best
        out[better] = value
        best[better] = score[better]
    return out


def _resize(
    array: np.ndarray, new_shape: Sequence[int], order: int, separate_axis: int | None
) -> np.ndarray:
    if tuple(array.shape) == tuple(new_shape):
        return array.copy()
    factors = [n / o for n, o in zip(new_shape, array.shape, strict=True)]
    if separate_axis is None:
        return zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    in_plane = list(factors)
    in_plane[separate_axis] = 1.0
    resized = zoom(array, in_plane, order=order, mode="nearest", grid_mode=True)
    along = [1.0] * array.ndim
    along[separate_axis] = factors[separate_axis]
    return zoom(resized, along, order=0, mode="nearest", grid_mode=True)


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class PreprocessingPlan:
    """The part of a plans configuration that preprocessing needs."""

    spacing: tuple[float, float, float]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: dict[str, dict[str, float]]

    @classmethod
    def from_plans(cls, plans: dict, configuration: str = "3d_fullres") -> PreprocessingPlan:
        try:
            config = plans["configurations"][configuration]
        except KeyError as error:
            known = ", ".join(plans.get("configurations", {}))
            raise DatasetError(
                f"plans have no configuration {configuration!r} (have: {known})"
            ) from error
        return cls(
            spacing=tuple(config["spacing"]),
            normalization_schemes=tuple(config["normalization_schemes"]),
            use_mask_for_norm=tuple(config["use_mask_for_norm"]),
            intensity_properties=plans["foreground_intensity_properties_per_channel"],
        )


def preprocess_images(
    images: np.ndarray,
    geometry: Geometry,
    plan: PreprocessingPlan,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, normalise, resample one case; return data, label and the properties to undo it."""
    cropped = crop_to_nonzero(images, label)
    data = normalise(
        cropped.images,
        cropped.mask,
        plan.normalization_schemes,
        plan.use_mask_for_norm,
        plan.intensity_properties,
    )
    shape_after_crop = data.shape[1:]
    target_shape = new_shape_for(shape_after_crop, geometry.spacing, plan.spacing)
    axis = coarse_axis(geometry.spacing, plan.spacing)
    data = resample_images(data, target_shape, axis)
    resampled_label = (
        resample_label(cropped.label, target_shape, axis) if cropped.label is not None else None
    )
    properties = {
        "geometry": geometry.to_json(),
        "shape_before_cropping": list(images.shape[1:]),
        "bbox_used_for_cropping": [list(b) for b in cropped.bbox],
        "shape_after_cropping_and_before_resampling": list(shape_after_crop),
        "spacing_before_resampling": list(geometry.spacing),
        "spacing": list(plan.spacing),
        "shape_after_resampling": list(target_shape),
        "separate_axis": axis,
    }
    return data, resampled_label, properties


def restore_label(label: np.ndarray, properties: dict) -> Volume:
    """Map a label array in preprocessed space back onto the raw image's exact grid."""
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    restored = resample_label(label, shape_cropped, properties["separate_axis"])
    return _uncrop(restored, properties)


def restore_probabilities(probabilities: np.ndarray, properties: dict) -> Volume:
    """Labels on the raw grid from class probabilities (K, X, Y, Z) in preprocessed space.

    As nnU-Net exports predictions: the probabilities are resampled (linearly, the coarse
    axis by nearest neighbour) and the argmax taken on the raw grid, which keeps thin
    structures that resampling a hard label map would lose. One class at a time inside the
    crop box (a running maximum; ties go to the lower label, as `argmax`), so the K maps on
    the full grid are never held at once: with 100 classes a 512x512x300 CT would need 31 GB
    for them.
    """
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


def restore_probability_maps(probabilities: np.ndarray, properties: dict) -> Volume:
    """Class probabilities on the raw grid, as a vector volume (X, Y, Z, K); outside the
    crop box the scan was empty, so background has probability 1 there."""
    full = np.zeros((*properties["shape_before_cropping"], len(probabilities)), np.float32)
    full[..., 0] = 1.0
    slicer = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    for k, resized in enumerate(_cropped_probability_maps(probabilities, properties)):
        full[(*slicer, k)] = resized  # into place, one class at a time: no stacked copy
    return Volume(full, Geometry.from_json(properties["geometry"]))


def _cropped_probability_maps(probabilities: np.ndarray, properties: dict):
    """Each class's probabilities resampled onto the raw grid's crop box, one at a time."""
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    axis = properties["separate_axis"]
    for channel in probabilities:
        yield _resize(channel.astype(np.float32), shape_cropped, 1, axis)


def preprocessed_geometry(properties: dict) -> Geometry:
    """Where the voxels of a preprocessed array lie: the raw grid, cropped, then rescaled."""
    return resized_geometry(
        Geometry.from_json(properties["geometry"]),
        properties["shape_after_cropping_and_before_resampling"],
        properties["shape_after_resampling"],
        start=[lo for lo, _ in properties["bbox_used_for_cropping"]],
    )


def resized_geometry(geometry: Geometry, before: Sequence[int], after: Sequence[int],
                     start: Sequence[int] = (0, 0, 0)) -> Geometry:
    """The grid of an array of shape BEFORE (starting at voxel START of GEOMETRY's grid)
    resized to AFTER with `zoom(grid_mode=True)`, which keeps the outer voxel edges fixed."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    scale = before / after  # input voxels per output voxel
    first_centre = np.asarray(start, float) + 0.5 * scale - 0.5  # input index of voxel 0
    origin = geometry.affine_lps @ np.append(first_centre, 1.0)
    return Geometry(
        spacing=tuple(float(v) for v in np.asarray(geometry.spacing) * scale),
        origin=tuple(float(v) for v in origin[:3]),
        direction=geometry.direction,
    )


def _uncrop(label: np.ndarray, properties: dict) -> Volume:
    full = np.zeros(properties["shape_before_cropping"], dtype=label.dtype)
    slicer = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    full[slicer] = label
    return Volume(full, Geometry.from_json(properties["geometry"]))


def class_locations(label: np.ndarray, classes: Sequence[int]) -> dict[str, list[list[int]]]:
    """Up to 10,000 voxel positions per foreground class, so sampling needs no full scan."""
    rng = np.random.RandomState(CLASS_LOCATION_SEED)
    found = {}
    for value in classes:
        positions = np.argwhere(label == value)
        if len(positions) > CLASS_LOCATION_SAMPLES:
            positions = positions[rng.choice(len(positions), CLASS_LOCATION_SAMPLES, replace=False)]
        found[str(value)] = positions.tolist()
    return found


# --------------------------------------------------------------------------- a dataset


def preprocess_case(case: Case, plan: PreprocessingPlan, out_dir: Path, classes: Sequence[int]):
    """Preprocess one case to OUT/<case>.npz + OUT/<case>.json (written last, atomically)."""
    images, label, geometry = read_case(case)
    data, seg, properties = preprocess_images(images, geometry, plan, label)
    properties["case_id"] = case.case_id
    if seg is not None:
        properties["class_locations"] = class_locations(seg, classes)
    arrays = {"data": data}
    if seg is not None:
        arrays["seg"] = seg.astype(np.int16 if seg.max() > 127 else np.int8)[None]
    _save_npz_atomic(out_dir / f"{case.case_id}.npz", arrays)
    write_json(properties, out_dir / f"{case.case_id}.json")
    return case.case_id


def is_preprocessed(out_dir: Path, case_id: str) -> bool:
    """A case is done when its properties file (written after the arrays) is complete."""
    properties = out_dir / f"{case_id}.json"
    if not (properties.is_file() and (out_dir / f"{case_id}.npz").is_file()):
        return False
    try:
        return "shape_after_resampling" in json.loads(properties.read_text())
    except (OSError, ValueError):
        return False


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


def load_preprocessed(
    out_dir: str | Path, case_id: str
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    out_dir = Path(out_dir)
    with np.load(out_dir / f"{case_id}.npz") as arrays:
        data = arrays["data"]
        seg = arrays.get("seg", None)
    properties = json.loads((out_dir / f"{case_id}.json").read_text())
    return data, seg, properties


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_output(path) as staging:
        np.savez(staging, **arrays)
