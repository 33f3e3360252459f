"""The steps of preprocessing, each a pure array function: crop to the non-zero region,
normalise per channel, resample (nnU-Net's interpolation rules), and the grid a resized
array lies on.

Resampling follows nnU-Net's default: 3rd-order spline for images, linear one-hot
interpolation for labels; when the spacing is anisotropic (ratio > 3) the in-plane axes are
resampled first and the coarse axis with nearest neighbour, so thick slices are not smeared
into each other. Coordinates map voxel centres the way `skimage.transform.resize` does,
here with `scipy.ndimage.zoom(grid_mode=True)`.

`resize` gives zoom's answer without running zoom on the volume: a spline zoom of a grid
onto a grid is separable, so it is one matrix per axis (zoom applied to an identity matrix:
zoom's own prefilter, boundary and coordinates) multiplied in axis by axis. Equal to zoom
to 1e-15 (float64) and 5-20x faster at 256^3, where zoom spends most of its time
prefiltering the whole volume in float64 before sampling it (bench/resampling_speed.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.ndimage import binary_fill_holes, zoom

from medpipe.errors import DatasetError
from medpipe.io import Geometry
from medpipe.planning.plans import IntensityProperties

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD


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
        bbox = tuple(_extent(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                     for axis in range(mask.ndim))
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    return Cropped(
        images=images[(slice(None), *slicer)],
        label=label[slicer] if label is not None else None,
        mask=mask[slicer],
        bbox=bbox,
    )


def _extent(present: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D mask (a mask's projection on one axis:
    its bounding box without listing every voxel)."""
    index = np.flatnonzero(present)
    return int(index[0]), int(index[-1]) + 1


def normalise(
    images: np.ndarray,
    mask: np.ndarray,
    schemes: Sequence[str],
    use_mask: Sequence[bool],
    intensity_properties: dict[str, IntensityProperties],
) -> np.ndarray:
    """Per channel: CT clip + global z-score, or per-case z-score (optionally within mask)."""
    out = np.empty_like(images, dtype=np.float32)
    for c, (scheme, masked) in enumerate(zip(schemes, use_mask, strict=True)):
        image = images[c].astype(np.float32)
        if scheme == "CTNormalization":
            props = intensity_properties[str(c)]
            image = np.clip(image, props.percentile_00_5, props.percentile_99_5)
            out[c] = (image - props.mean) / max(props.std, 1e-8)
        elif scheme == "ZScoreNormalization":
            region = mask if masked else np.ones_like(mask)
            values = image[region]
            # statistics in float64: squares of float32 voxels overflow beyond ~1e19
            mean, std = ((values.mean(dtype=np.float64), values.std(dtype=np.float64))
                         if values.size else (0.0, 1.0))
            normalised = ((image - mean) / max(std, 1e-8)).astype(np.float32)
            out[c] = np.where(region, normalised, 0.0) if masked else normalised
        elif scheme == "RescaleTo01Normalization":
            low, high = image.min(), image.max()
            out[c] = (image - low) / max(high - low, 1e-8)
        elif scheme == "NoNormalization":
            out[c] = image
        else:
            raise DatasetError(f"unknown normalisation scheme {scheme!r}")
    return out


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
        resized = resize(image.astype(np.float64), new_shape, 3, separate_axis)
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
        score = resize((label == value).astype(np.float32), new_shape, 1, separate_axis)
        better = score > best
        out[better] = value
        best[better] = score[better]
    return out


def resize(
    array: np.ndarray, new_shape: Sequence[int], order: int, separate_axis: int | None
) -> np.ndarray:
    """ARRAY (float) resized to NEW_SHAPE by a spline of ORDER, as `zoom(order=ORDER,
    mode="nearest", grid_mode=True)` does; SEPARATE_AXIS, if any, by nearest neighbour."""
    if tuple(array.shape) == tuple(new_shape):
        return array.copy()
    out = array
    # shrinking axes first: every later product then runs on fewer voxels
    for axis in sorted(range(array.ndim), key=lambda a: new_shape[a] / array.shape[a]):
        if out.shape[axis] != new_shape[axis]:
            matrix = _axis_matrix(array.shape[axis], int(new_shape[axis]),
                                  0 if axis == separate_axis else order)
            out = _multiply_along(out, matrix.astype(array.dtype, copy=False), axis)
    return out


@lru_cache(maxsize=128)
def _axis_matrix(size: int, new_size: int, order: int) -> np.ndarray | sparse.csr_array:
    """The (new_size, size) matrix of a 1-D zoom: column j is zoom's answer for the unit
    vector j. Sparse for orders 0 and 1 (two weights per row; zeros never multiply a voxel,
    so a non-finite voxel spreads no further than zoom spreads it), dense above (the spline
    prefilter couples every voxel of a line, in zoom too)."""
    matrix = zoom(np.eye(size), (new_size / size, 1.0), order=order, mode="nearest",
                  grid_mode=True)
    return sparse.csr_array(matrix) if order <= 1 else matrix


def _multiply_along(array: np.ndarray, matrix, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    product = matrix @ moved.reshape(moved.shape[0], -1)
    product = product.toarray() if sparse.issparse(product) else product
    return np.moveaxis(product.reshape(matrix.shape[0], *moved.shape[1:]), 0, axis)


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
