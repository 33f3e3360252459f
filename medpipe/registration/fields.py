"""Displacement fields: the one place where medpipe's internal field and ITK's meet.

Internally a network predicts `ddf`, shape (3, X, Y, Z), in voxels of the grid it ran on,
channel c moving along array axis c: the warped image at voxel x is moving(x + ddf(x)),
exactly what MONAI's `Warp` computes. Users get ITK's convention instead: a vector image on
the fixed image's grid whose value at a fixed physical point p (LPS mm) is the displacement
d(p) such that p + d(p) is the corresponding point in the moving image. Then

    SimpleITK.Resample(moving, fixed, SimpleITK.DisplacementFieldTransform(field))

reproduces medpipe's warped image, and ANTs/ITK tools read the file as a warp.

Every method (identity, the classical baseline, the networks) ends in such a field on the
fixed image's raw grid, and the evaluation warps and scores through it alone.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medpipe.io import Geometry, Volume, from_sitk, to_sitk


def voxels_to_mm(ddf: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(3, X, Y, Z) voxel displacements -> (3, X, Y, Z) LPS millimetres on GEOMETRY's grid."""
    linear = geometry.direction_matrix * np.asarray(geometry.spacing)
    return np.einsum("rc,c...->r...", linear, ddf)


def mm_to_voxels(displacement: np.ndarray, geometry: Geometry) -> np.ndarray:
    linear = np.linalg.inv(geometry.direction_matrix * np.asarray(geometry.spacing))
    return np.einsum("rc,c...->r...", linear, displacement)


def to_itk_field(displacement_mm: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An ITK displacement field image (vector of float64, mm) from (3, X, Y, Z) in mm."""
    vectors = np.moveaxis(displacement_mm.astype(np.float64), 0, -1)
    return to_sitk(Volume(vectors, geometry))


def field_to_ddf(field: sitk.Image) -> np.ndarray:
    """medpipe's ddf (3, X, Y, Z) in voxels of the field's own grid, from an ITK field."""
    volume = from_sitk(field)
    return mm_to_voxels(np.moveaxis(volume.array.astype(np.float64), -1, 0), volume.geometry)


def ddf_to_field(ddf: np.ndarray, geometry: Geometry) -> sitk.Image:
    """The ITK field of a voxel ddf predicted on GEOMETRY's grid (same grid, no resampling)."""
    return to_itk_field(voxels_to_mm(ddf, geometry), geometry)


def identity_field(geometry: Geometry, shape: tuple[int, int, int]) -> sitk.Image:
    return to_itk_field(np.zeros((3, *shape)), geometry)


def physical_points(geometry: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """(3, X, Y, Z) LPS coordinates of every voxel centre of a grid."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape[:3]],
                                 indexing="ij"))
    affine = geometry.affine_lps
    return np.einsum("rc,c...->r...", affine[:3, :3], index) + affine[:3, 3, None, None, None]


def compose_field(
    target: Geometry,
    target_shape: tuple[int, int, int],
    ddf: np.ndarray | torch.Tensor | None = None,
    source: Geometry | None = None,
    prealign: np.ndarray | None = None,
) -> sitk.Image:
    """The ITK field on TARGET's grid of `prealign o (id + ddf)`.

    DDF is a voxel field predicted on SOURCE's grid (the fixed image as the network saw it:
    cropped, resampled, padded); it is interpolated (trilinear, the border value beyond the
    grid) at TARGET's voxel centres. PREALIGN is a 4x4 matrix in LPS mm taking fixed points
    into the moving image (the affine pre-alignment), applied after the deformable part, as
    the moving image was pre-aligned before the network saw it. Either part may be absent.

    With P = PREALIGN, p the target voxel's point and S = SOURCE's voxel size and
    direction, the displacement is P p - p + P S ddf(p): for a translation (the moments
    start) a constant plus one 3x3 per voxel, computed in torch straight into ITK's
    (z, y, x, 3) memory layout (the interpolated field in float32). On a 1 mm brain grid
    (197 x 233 x 189) this took 2.0 s with scipy and a layout conversion; now about 0.3 s.
    """
    shape = tuple(int(n) for n in target_shape[:3])
    matrix = np.eye(4) if prealign is None else np.asarray(prealign, dtype=np.float64)
    deformable = None
    if ddf is not None:
        source = source or target
        # voxels -> mm on the (small) source grid: mixing channels commutes with
        # interpolating each, and an (N, 3) x (3, 3) product over 8.7 M target voxels
        # costs more than the interpolation itself
        per_voxel = matrix[:3, :3] @ (source.direction_matrix * np.asarray(source.spacing))
        in_mm = torch.einsum("rc,c...->r...", torch.from_numpy(per_voxel.astype(np.float32)),
                             torch.as_tensor(ddf, dtype=torch.float32))
        sampled = _sample_zyx(in_mm, source, target, shape)  # (z, y, x, 3) mm
        deformable = sampled.to(torch.float64, memory_format=torch.contiguous_format)
    if np.array_equal(matrix[:3, :3], np.eye(3)):  # none or a translation (moments)
        shift = torch.from_numpy(matrix[:3, 3])
        displacement = (deformable.add_(shift) if deformable is not None
                        else shift.expand(*shape[::-1], 3).contiguous())
    else:
        # float64 and ITK's own order (the point first, then where P sends it): a point
        # that P puts on the moving grid's edge stays on the side ITK's resampling puts it
        points = torch.from_numpy(physical_points(target, shape)).permute(3, 2, 1, 0)
        displacement = (points @ torch.from_numpy(matrix[:3, :3]).T
                        + torch.from_numpy(matrix[:3, 3]) - points).contiguous()
        if deformable is not None:
            displacement += deformable
    image = sitk.GetImageFromArray(displacement.numpy(), isVector=True)
    image.SetSpacing(target.spacing)
    image.SetOrigin(target.origin)
    image.SetDirection(target.direction)
    return image


def resample_ddf(ddf: torch.Tensor, source: Geometry, target: Geometry,
                 target_shape: tuple[int, int, int]) -> torch.Tensor:
    """A voxel ddf (3, X, Y, Z) made on SOURCE's grid as the same displacement (trilinear,
    border value beyond SOURCE) in voxels of TARGET's grid of TARGET_SHAPE: a network's
    prediction handed to a refinement that runs on a finer grid."""
    source_linear = source.direction_matrix * np.asarray(source.spacing)
    target_linear = np.linalg.inv(target.direction_matrix * np.asarray(target.spacing))
    mix = torch.from_numpy((target_linear @ source_linear).astype(np.float32))
    in_target_voxels = torch.einsum("rc,c...->r...", mix, ddf.float())
    sampled = _sample_zyx(in_target_voxels, source, target, tuple(target_shape))
    return sampled.permute(3, 2, 1, 0).contiguous()


def _sample_zyx(ddf: np.ndarray | torch.Tensor, source: Geometry, target: Geometry,
                shape: tuple[int, int, int]) -> torch.Tensor:
    """DDF (3, X, Y, Z on SOURCE's grid) trilinearly interpolated at the voxel centres of
    TARGET's grid of SHAPE, as (z, y, x, 3); beyond SOURCE's grid the nearest border value
    (scipy's `mode="nearest"`).

    When the two grids share their axes (a network's grid is the fixed scan's, cropped and
    rescaled), trilinear interpolation is three 1-D interpolations, each a small matrix
    product: at 1 mm (197 x 233 x 189 from 33 x 39 x 32) 0.1 s instead of grid_sample's 0.5 s
    over 8.7 M points. Grids that do not (a reoriented scan) go through grid_sample."""
    ddf = torch.as_tensor(ddf, dtype=torch.float32)
    to_source = np.linalg.inv(source.affine_lps) @ target.affine_lps  # voxel -> voxel
    linear = to_source[:3, :3]
    if np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9):
        x, y, z = (_interpolation_matrix(to_source[a, a] * np.arange(shape[a])
                                         + to_source[a, 3], ddf.shape[1 + a])
                   for a in range(3))
        # on the small grid in ITK's order (k, j, i, c); the last, largest product then
        # writes (z, y, x, c) in place: no transpose of the full-size field
        small = ddf.permute(3, 2, 1, 0).contiguous()
        k, j, i, c = small.shape
        along_x = torch.matmul(x, small.view(k * j, i, c))  # (k j, X, c)
        along_y = torch.matmul(y, along_x.view(k, j, -1))  # (k, Y, X c)
        return (z @ along_y.view(k, -1)).view(*shape[::-1], c)  # (Z, Y X c)
    # grid_sample's [-1, 1] (align_corners) from the source index
    size = np.asarray(ddf.shape[1:], dtype=np.float64)
    normalise = np.diag([*(2.0 / np.maximum(size - 1, 1)), 1.0])
    normalise[:3, 3] = -1.0
    matrix = normalise @ to_source
    # grid_sample reads the last grid axis as (W, H, D) = our (Z, Y, X): reverse the rows;
    # the grid itself is laid out (z, y, x) so the output comes in ITK's order
    rows = torch.from_numpy(matrix[2::-1, :3].astype(np.float32))
    offset = torch.from_numpy(matrix[2::-1, 3].astype(np.float32))
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = (axes[2][:, None, None, None] * rows[:, 2] + axes[1][None, :, None, None]
            * rows[:, 1] + axes[0][None, None, :, None] * rows[:, 0] + offset)
    sampled = F.grid_sample(ddf[None], grid[None], mode="bilinear",
                            padding_mode="border", align_corners=True)
    return sampled[0].permute(1, 2, 3, 0)


def _interpolation_matrix(positions: np.ndarray, size: int) -> torch.Tensor:
    """(len(POSITIONS), SIZE) weights of 1-D linear interpolation at POSITIONS (source
    indices), clamped to the border."""
    positions = np.clip(positions, 0, size - 1)
    low = np.minimum(np.floor(positions).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    weight = positions - low
    matrix = np.zeros((len(positions), size), dtype=np.float64)
    rows = np.arange(len(positions))
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return torch.from_numpy(matrix.astype(np.float32))


def warp_with_field(moving: Volume, field: sitk.Image, labels: bool = False) -> Volume:
    """MOVING resampled onto the field's grid through it (`resample`, or `warp_labels`
    for a label map)."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # it consumes its input
    geometry, shape = from_sitk(field).geometry, field.GetSize()
    if labels:
        return warp_labels(moving, transform, geometry, shape)
    return resample(moving, transform, geometry, shape)


def resample(moving: Volume, transform: sitk.Transform, geometry: Geometry,
             shape: tuple[int, ...], labels: bool = False) -> Volume:
    """MOVING on the grid (GEOMETRY, SHAPE) through TRANSFORM (fixed -> moving points):
    linear, or nearest neighbour for labels; points outside the moving image get 0."""
    reference = sitk.Image([int(n) for n in shape[:3]], sitk.sitkUInt8)
    reference.SetSpacing(geometry.spacing)
    reference.SetOrigin(geometry.origin)
    reference.SetDirection(geometry.direction)
    warped = sitk.Resample(
        to_sitk(moving), reference, transform,
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
    )
    return from_sitk(warped)


def warp_labels(moving: Volume, transform: sitk.Transform, geometry: Geometry,
                shape: tuple[int, ...]) -> Volume:
    """A label map through TRANSFORM, the one way every method's labels are warped: each
    label's mask interpolated linearly, then per voxel the label of the largest value (what
    ANTs' `genericLabel` interpolator approximates). Nearest neighbour would move Dice by
    0.01-0.03 against it on the demo brains, so mixing the two would score the interpolator,
    not the registration. Points outside the moving image are background (0)."""
    values = np.unique(moving.array)
    best = np.zeros(tuple(int(n) for n in shape[:3]), dtype=moving.array.dtype)
    best_weight = np.zeros(best.shape, dtype=np.float32)
    for value in values:
        mask = moving.with_array((moving.array == value).astype(np.float32))
        weight = resample(mask, transform, geometry, shape).array
        if value == 0:
            best_weight = weight
            continue
        better = weight > best_weight
        best[better] = value
        best_weight = np.where(better, weight, best_weight)
    return Volume(best, geometry)


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 LPS matrix of an affine (or composite of affine-like) SimpleITK transform.

    Found by applying the transform to the origin and the unit vectors: exact for any
    transform that is affine, whatever its centre/translation parametrisation.
    """
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - origin
    matrix[:3, 3] = origin
    return matrix
