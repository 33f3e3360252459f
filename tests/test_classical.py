"""The classical SimpleITK baseline on two real demo brains: outputs on the fixed grid, a
displacement field that follows ITK's convention exactly, and better overlap than none."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medpipe.io import read_image, to_sitk
from medpipe.metrics import deformation_metrics, segmentation_metrics
from medpipe.registration.classical import (
    ClassicalSettings,
    displacement_field,
    register_classical,
)
from medpipe.registration.fields import field_to_ddf, identity_field, resample, warp_with_field


def warp_volume(moving, transform, fixed, labels=False):
    return resample(moving, transform, fixed.geometry, fixed.shape, labels)


@pytest.fixture(scope="module")
def pair(tiny_pipeline):
    raw = tiny_pipeline / "raw"
    fixed = read_image(raw / "imagesTr" / "brain_000_0000.nii.gz")
    moving = read_image(raw / "imagesTr" / "brain_001_0000.nii.gz")
    fixed_labels = read_image(raw / "labelsTr" / "brain_000.nii.gz")
    moving_labels = read_image(raw / "labelsTr" / "brain_001.nii.gz")
    transform = register_classical(fixed, moving, ClassicalSettings(demons_iterations=20))
    return fixed, moving, fixed_labels, moving_labels, transform


def test_outputs_lie_on_the_fixed_grid(pair):
    fixed, _, _, moving_labels, transform = pair
    warped = warp_volume(moving_labels, transform, fixed, labels=True)
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    assert set(np.unique(warped.array)) <= {0, 1, 2, 3}  # nearest neighbour: no new labels
    ddf = field_to_ddf(displacement_field(transform, fixed))
    assert ddf.shape == (3, *fixed.shape)
    assert deformation_metrics(ddf)["folding_percent"] < 1.0


def test_displacement_field_is_itks_convention(pair):
    fixed, moving, _, _, transform = pair
    field = displacement_field(transform, fixed)
    # the field, used as a transform, resamples exactly like the transform it came from
    as_transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    via_field = warp_volume(moving, as_transform, fixed)
    direct = warp_volume(moving, transform, fixed)
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(via_field.array[inner], direct.array[inner], atol=1e-2)
    # and a vector is p -> p + d(p): check one voxel against TransformPoint
    image = to_sitk(fixed)
    index = (10, 12, 9)
    point = np.asarray(image.TransformIndexToPhysicalPoint(index))
    vector = np.asarray(field[index])
    np.testing.assert_allclose(point + vector, transform.TransformPoint(point.tolist()),
                               atol=1e-6)
    # medpipe's ddf is the same vector in fixed-grid voxels
    ddf = field_to_ddf(field)
    step = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    np.testing.assert_allclose(step @ ddf[(slice(None), *index)], vector, atol=1e-6)


def test_the_baseline_improves_overlap_over_no_registration(pair):
    # (the slower B-spline stage is checked at the demo's 3 mm by hand: see classical.py)
    fixed, _, fixed_labels, moving_labels, transform = pair
    classes = {"CSF": 1, "GM": 2, "WM": 3}

    def mean_dice(field):
        warped = warp_with_field(moving_labels, field, labels=True)
        scores = segmentation_metrics(warped.array, fixed_labels.array, classes, fixed.spacing)
        return np.mean([s["dice"] for s in scores.values()])

    before = mean_dice(identity_field(fixed.geometry, fixed.shape))
    after = mean_dice(displacement_field(transform, fixed))
    assert after > before + 0.05, (before, after)
