"""Dice, HD95 and volumes against independent computations on shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from medpipe.metrics import dice_per_class, segmentation_metrics, summarise

SPACING = (1.5, 0.8, 3.0)  # anisotropic on purpose: distances must use it


def blob_labels(seed: int, shape=(40, 36, 24)) -> np.ndarray:
    """Three overlapping smooth random blobs as labels 1-3."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), (0, 4, 4, 3))
    label = np.argmax(field, axis=0) + 1
    label[field.max(axis=0) < np.quantile(field.max(axis=0), 0.4)] = 0
    return label.astype(np.uint8)


def surface_points_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Border voxels (the mask minus its erosion), in mm: the surface MONAI measures."""
    border = mask & ~ndimage.binary_erosion(mask)
    return np.argwhere(border) * np.asarray(spacing)


def hd95_by_kdtree(a: np.ndarray, b: np.ndarray, spacing) -> float:
    pa, pb = surface_points_mm(a, spacing), surface_points_mm(b, spacing)
    a_to_b = cKDTree(pb).query(pa)[0]
    b_to_a = cKDTree(pa).query(pb)[0]
    return max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


def sitk_dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(
        sitk.GetImageFromArray((reference == value).astype(np.uint8)),
        sitk.GetImageFromArray((prediction == value).astype(np.uint8)),
    )
    return overlap.GetDiceCoefficient()


def test_dice_and_hd95_agree_with_independent_computations():
    reference, prediction = blob_labels(0), blob_labels(0)
    prediction = np.roll(prediction, 2, axis=0)  # a shifted, slightly wrong prediction
    prediction[ndimage.binary_dilation(prediction == 1, iterations=1)] = 1
    classes = {"a": 1, "b": 2, "c": 3}
    metrics = segmentation_metrics(prediction, reference, classes, SPACING)
    for name, value in classes.items():
        assert metrics[name]["dice"] == pytest.approx(sitk_dice(prediction, reference, value),
                                                      abs=1e-12)
        expected = hd95_by_kdtree(prediction == value, reference == value, SPACING)
        assert metrics[name]["hd95"] == pytest.approx(expected, rel=1e-5)
        assert 0.3 < metrics[name]["dice"] < 1.0


def test_known_answers_for_shifted_slab():
    """A 10-voxel slab moved by 2 voxels along axis 2 (3 mm voxels): Dice 8/10, and every
    boundary point that moves is 6 mm from its counterpart."""
    reference = np.zeros((30, 30, 30), np.uint8)
    reference[:, :, 10:20] = 1
    prediction = np.roll(reference, 2, axis=2)
    metrics = segmentation_metrics(prediction, reference, {"slab": 1}, SPACING)["slab"]
    assert metrics["dice"] == pytest.approx(0.8)
    assert metrics["hd95"] == pytest.approx(6.0)
    voxel_ml = np.prod(SPACING) / 1000
    assert metrics["volume_ref_ml"] == pytest.approx(9000 * voxel_ml)
    assert metrics["volume_diff_ml"] == pytest.approx(0.0)


def test_identical_masks_score_perfectly():
    reference = blob_labels(1)
    metrics = segmentation_metrics(reference, reference.copy(), {"a": 1, "b": 2}, SPACING)
    for values in metrics.values():
        assert values["dice"] == 1.0
        assert values["hd95"] == 0.0


def test_empty_classes_are_nan_not_perfect():
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:5, 2:5, 2:5] = 1
    prediction = np.zeros_like(reference)
    metrics = segmentation_metrics(prediction, reference, {"missed": 1, "absent": 2}, SPACING)
    assert metrics["missed"]["dice"] == 0.0
    assert math.isnan(metrics["missed"]["hd95"])  # distance to nothing is undefined
    assert math.isnan(metrics["absent"]["dice"])  # nothing to find, nothing found
    assert math.isnan(metrics["absent"]["hd95"])


def test_dice_per_class_matches_numpy():
    import torch

    reference, prediction = blob_labels(2), np.roll(blob_labels(2), 1, axis=1)
    dice = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), 4)
    for value in (1, 2, 3):
        p, r = prediction == value, reference == value
        assert dice[value - 1].item() == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))


def test_summary_skips_nan_and_counts():
    summary = summarise([0.5, math.nan, 1.0])
    assert summary == {"mean": 0.75, "std": 0.25, "n": 2}
    assert summarise([math.nan])["n"] == 0


def smooth_field(seed: int, shape=(24, 20, 16), amplitude=2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), (0, 3, 3, 3))
    return amplitude * field / np.abs(field).max()


def test_jacobian_matches_simpleitk_on_an_anisotropic_grid():
    from medpipe.metrics import jacobian_determinant

    ddf = smooth_field(0)
    # ITK's filter takes the field in mm on a spaced grid, with (z, y, x) array order
    field_mm = np.moveaxis(ddf * np.asarray(SPACING)[:, None, None, None], 0, -1)
    image = sitk.GetImageFromArray(np.transpose(field_mm, (2, 1, 0, 3)), isVector=True)
    image.SetSpacing(SPACING)
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image, True))
    ours = jacobian_determinant(ddf)
    inner = (slice(1, -1),) * 3  # both use central differences away from the border
    np.testing.assert_allclose(ours[inner], np.transpose(itk, (2, 1, 0))[inner], atol=1e-5)


def test_deformation_metrics_known_answers():
    from medpipe.metrics import deformation_metrics

    zero = np.zeros((3, 10, 10, 10))
    assert deformation_metrics(zero) == {
        "folding_percent": 0.0, "sdlogj": 0.0, "sdlogj_learn2reg": 0.0, "jacobian_min": 1.0,
        "jacobian_mean": 1.0,
    }
    scaling = np.zeros((3, 10, 10, 10))
    scaling[0] = 0.5 * np.arange(10)[:, None, None]  # x -> 1.5 x: det J = 1.5 everywhere
    assert deformation_metrics(scaling)["jacobian_mean"] == pytest.approx(1.5)
    folded = np.zeros((3, 10, 10, 10))
    folded[0] = -2.0 * np.arange(10)[:, None, None]  # x -> -x: every voxel folds
    metrics = deformation_metrics(folded)
    assert metrics["folding_percent"] == 100.0 and metrics["jacobian_min"] == pytest.approx(-1)
    mask = np.zeros((10, 10, 10), bool)
    mask[:5] = True
    assert deformation_metrics(folded, mask)["folding_percent"] == 100.0
