"""The field convention: medpipe's spatial transformer (MONAI `Warp`) on a voxel ddf and
SimpleITK's `DisplacementFieldTransform` on our exported field must warp alike, on a grid
that is anything but the identity (anisotropic, shifted, permuted and flipped axes)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.blocks import Warp

from medpipe.io import Geometry, Volume, to_sitk
from medpipe.metrics import deformation_metrics, jacobian_determinant
from medpipe.preprocessing import PreprocessingPlan, preprocess_images
from medpipe.registration.fields import (
    affine_matrix,
    compose_field,
    ddf_to_field,
    field_to_ddf,
    physical_points,
    resample,
    resample_ddf,
    warp_with_field,
)

SHAPE = (40, 36, 28)
# axes permuted (i -> -y, j -> x, k -> z) and flipped: a left-handed, LPS-unfriendly grid
GEOMETRY = Geometry(
    spacing=(1.5, 0.8, 2.5),
    origin=(-30.0, 12.0, 40.0),
    direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
)


def smooth_image(shape=SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    blobs = np.exp(-((grid[0] - 0.2) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2) / 0.15)
    blobs += 0.6 * np.exp(-((grid[0] + 0.4) ** 2 + (grid[1] - 0.3) ** 2 + grid[2] ** 2) / 0.05)
    return blobs.astype(np.float32)


def smooth_ddf(shape=SHAPE, amplitude=2.5) -> np.ndarray:
    """A smooth, non-folding displacement in voxels, zero at the border."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij"))
    bump = np.sin(grid[0]) * np.sin(grid[1]) * np.sin(grid[2])
    return np.stack([amplitude * bump * np.cos(grid[1]), -amplitude * bump,
                     0.5 * amplitude * bump * np.sin(2 * grid[0])]).astype(np.float32)


def interior(array: np.ndarray, margin: int = 3) -> np.ndarray:
    return array[margin:-margin, margin:-margin, margin:-margin]


def test_monai_warp_and_itk_field_agree_on_an_oblique_anisotropic_grid():
    image, ddf = smooth_image(), smooth_ddf()
    ours = Warp(mode="bilinear", padding_mode="zeros")(
        torch.from_numpy(image)[None, None], torch.from_numpy(ddf)[None]
    )[0, 0].numpy()
    field = ddf_to_field(ddf, GEOMETRY)
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSpacing() == GEOMETRY.spacing and field.GetOrigin() == GEOMETRY.origin
    itk = warp_with_field(Volume(image, GEOMETRY), field).array
    assert np.abs(ours - image).max() > 0.2  # the warp does something
    np.testing.assert_allclose(interior(itk), interior(ours), atol=1e-4)
    # the field file holds millimetres: a voxel shift along i is 1.5 mm along -y (LPS)
    vector = sitk.GetArrayFromImage(field)[14, 18, 20]  # (k, j, i) order in ITK arrays
    expected = GEOMETRY.direction_matrix @ (np.asarray(GEOMETRY.spacing) * ddf[:, 20, 18, 14])
    np.testing.assert_allclose(vector, expected, rtol=1e-6)
    np.testing.assert_allclose(field_to_ddf(field), ddf, atol=1e-5)


def test_compose_field_resamples_a_coarse_ddf_and_applies_the_prealignment():
    # the network ran on a coarser grid covering the same region; a pre-alignment follows
    coarse = Geometry(spacing=(3.0, 1.6, 5.0), origin=GEOMETRY.origin,
                      direction=GEOMETRY.direction)
    coarse_shape = (20, 18, 14)
    ddf = smooth_ddf(coarse_shape, amplitude=1.0)
    prealign = np.eye(4)
    prealign[:3, :3] = [[1.02, 0.05, 0.0], [-0.05, 0.98, 0.0], [0.0, 0.0, 1.0]]
    prealign[:3, 3] = [2.0, -3.0, 1.5]
    field = compose_field(GEOMETRY, SHAPE, ddf, coarse, prealign)
    # independent check at one voxel: physical point -> coarse index -> displacement
    point = physical_points(GEOMETRY, SHAPE)[:, 12, 9, 7]
    index = np.linalg.solve(coarse.affine_lps, np.append(point, 1.0))[:3]
    from scipy.ndimage import map_coordinates

    d_vox = [map_coordinates(ddf[c], index[:, None], order=1)[0] for c in range(3)]
    moved = point + coarse.direction_matrix @ (np.asarray(coarse.spacing) * d_vox)
    expected = prealign[:3, :3] @ moved + prealign[:3, 3] - point
    np.testing.assert_allclose(sitk.GetArrayFromImage(field)[7, 9, 12], expected, atol=1e-6)

    # prealignment alone equals SimpleITK's own affine transform
    only_affine = compose_field(GEOMETRY, SHAPE, prealign=prealign)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(prealign[:3, :3].ravel().tolist())
    affine.SetTranslation(prealign[:3, 3].tolist())
    moving = Volume(smooth_image(), GEOMETRY)
    np.testing.assert_allclose(
        warp_with_field(moving, only_affine).array,
        resample(moving, affine, GEOMETRY, SHAPE).array, atol=1e-4,
    )
    np.testing.assert_allclose(affine_matrix(affine), prealign, atol=1e-12)


@pytest.mark.parametrize("target_direction", [GEOMETRY.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1)],
                         ids=["shared-axes", "other-axes"])
def test_resample_ddf_moves_each_voxel_where_the_coarse_field_moves_its_point(target_direction):
    # a network's coarse prediction handed to a finer grid (separable path when the grids
    # share their axes, grid_sample otherwise): the same physical displacement everywhere
    from scipy.ndimage import map_coordinates

    coarse = Geometry(spacing=(3.0, 1.6, 5.0), origin=GEOMETRY.origin,
                      direction=GEOMETRY.direction)
    ddf = smooth_ddf((20, 18, 14), amplitude=1.5)
    target = Geometry(spacing=(1.2, 1.0, 2.0), origin=(-40.0, 0.0, 30.0),
                      direction=target_direction)
    shape = (24, 20, 16)
    fine = resample_ddf(torch.from_numpy(ddf), coarse, target, shape).numpy()
    assert fine.shape == (3, *shape)
    points = physical_points(target, shape).reshape(3, -1)
    index = (np.linalg.inv(coarse.affine_lps) @ np.vstack([points, np.ones(points.shape[1])]))
    sampled = np.stack([map_coordinates(ddf[c].astype(np.float64), index[:3], order=1,
                                        mode="nearest") for c in range(3)])
    mm = coarse.direction_matrix @ (np.asarray(coarse.spacing)[:, None] * sampled)
    expected = np.linalg.solve(target.direction_matrix * np.asarray(target.spacing), mm)
    assert np.abs(expected).max() > 0.5  # the field does something on this grid
    np.testing.assert_allclose(fine.reshape(3, -1), expected, atol=2e-5)


def test_affine_matrix_of_a_centred_transform():
    transform = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.1, -0.2, 0.3, (1.0, 2.0, 3.0))
    matrix = affine_matrix(transform)
    point = np.array([4.0, -7.0, 12.0])
    np.testing.assert_allclose(matrix[:3, :3] @ point + matrix[:3, 3],
                               transform.TransformPoint(point.tolist()), atol=1e-9)


def test_jacobian_matches_the_analytic_derivative():
    # u(x) = (a sin(w y), b x, c z^2) in voxels: det(I + grad u) = (1 - a w b cos(w y))(1 + 2cz)
    shape = (24, 40, 20)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    a, w, b, c = 3.0, 0.25, 2.0, 0.004  # a w b = 1.5: folds where cos(w y) > 2/3
    ddf = np.stack([a * np.sin(w * y), b * x, c * z**2])
    expected = (1 - a * w * b * np.cos(w * y)) * (1 + 2 * c * z)
    det = jacobian_determinant(ddf)
    # central differences of sin(w y) are exact up to sin(w)/w = 0.99; one-sided at the border
    np.testing.assert_allclose(interior(det, 1), interior(expected, 1), atol=0.03)
    metrics = deformation_metrics(ddf)
    assert metrics["folding_percent"] == pytest.approx(100 * np.mean(expected <= 0), abs=3.0)
    assert metrics["folding_percent"] > 10


def test_preprocessed_geometry_places_resampled_voxels_where_they_were():
    # a linear ramp in physical space survives crop + (spline) resampling unchanged, so the
    # preprocessed voxels must sit at the physical points the geometry says
    shape = (30, 26, 18)
    grid = Geometry(spacing=(1.5, 1.0, 2.4), origin=GEOMETRY.origin, direction=GEOMETRY.direction)
    image = np.zeros(shape, np.float32)
    points = physical_points(grid, shape)
    ramp = 0.3 * points[0] - 0.2 * points[1] + 0.5 * points[2] + 100.0
    image[4:26, 3:22, 2:16] = ramp[4:26, 3:22, 2:16]  # cropping keeps this box
    plan = PreprocessingPlan(spacing=(2.0, 1.2, 2.0), normalization_schemes=("NoNormalization",),
                             use_mask_for_norm=(False,), intensity_properties={})
    data, _, properties = preprocess_images(image[None], grid, plan)  # not anisotropic
    geometry = properties.preprocessed_geometry
    np.testing.assert_allclose(geometry.spacing, (2.0, 1.2, 2.0), rtol=0.05)
    at = physical_points(geometry, data.shape[1:])
    expected = 0.3 * at[0] - 0.2 * at[1] + 0.5 * at[2] + 100.0
    error = np.abs(interior(data[0], 4) - interior(expected, 4)).max()
    half_voxel_off = 0.5 * 0.5 * 2.0  # what a half-voxel error along k would cost
    assert error < 0.01 < half_voxel_off, error


@pytest.mark.parametrize("labels", [False, True])
def test_warped_outputs_lie_on_the_fixed_grid(labels):
    moving = Volume((smooth_image() > 0.5).astype(np.uint8) if labels else smooth_image(),
                    GEOMETRY)
    field = ddf_to_field(smooth_ddf(), GEOMETRY)
    warped = warp_with_field(moving, field, labels=labels)
    assert warped.shape == SHAPE
    assert warped.geometry.is_close(GEOMETRY, atol=1e-9)
    if labels:
        assert set(np.unique(warped.array)) <= {0, 1}
    assert to_sitk(warped).GetSize() == field.GetSize()


def test_labels_are_warped_by_their_interpolated_masks_as_an_independent_computation():
    """Every method's labels are warped one way: each label's mask interpolated linearly,
    then the label of the largest value; here against scipy on the same voxel field."""
    from scipy.ndimage import map_coordinates

    image = smooth_image()
    labels = np.digitize(image, [0.2, 0.5, 0.8]).astype(np.uint8)  # 0..3, nested blobs
    ddf = smooth_ddf(amplitude=3.7)
    warped = warp_with_field(Volume(labels, GEOMETRY), ddf_to_field(ddf, GEOMETRY),
                             labels=True)
    points = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")) + ddf
    weights = np.stack([map_coordinates((labels == k).astype(np.float64), points, order=1)
                        for k in range(4)])
    expected = np.argmax(weights, axis=0)
    assert warped.array.dtype == np.uint8
    np.testing.assert_array_equal(interior(warped.array), interior(expected))
    # nearest neighbour gives another answer on the boundaries
    transform = sitk.DisplacementFieldTransform(ddf_to_field(ddf, GEOMETRY))
    nearest = resample(Volume(labels, GEOMETRY), transform, GEOMETRY, SHAPE, labels=True)
    assert not np.array_equal(nearest.array, warped.array)


def test_learn2reg_sdlogj_as_their_evaluator_computes_it():
    """Learn2Reg's SDlogJ, rebuilt from its recipe: [-0.5, 0, 0.5] correlation per axis,
    identity added, a 2-voxel border dropped, std(log(clip(det + 3)))."""
    from scipy.ndimage import correlate

    ddf = smooth_ddf(amplitude=6.0).astype(np.float64)
    kernel = np.array([-0.5, 0.0, 0.5])
    grad = np.empty((3, 3, *ddf.shape[1:]))
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 3
        for c in range(3):
            grad[c, axis] = correlate(ddf[c], kernel.reshape(shape), mode="constant")
    grad += np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(grad, (0, 1), (-2, -1)))[2:-2, 2:-2, 2:-2]
    expected = np.std(np.log(np.clip(det + 3, 1e-9, 1e9)))
    metrics = deformation_metrics(ddf)
    assert metrics["sdlogj_learn2reg"] == pytest.approx(expected, rel=1e-9)
    assert metrics["sdlogj_learn2reg"] != pytest.approx(metrics["sdlogj"], rel=0.1)
