"""Preprocessing: nnU-Net's order, resumable, and an exact way back to the raw grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_dataset, oblique_geometry

from medpipe.data import load_dataset
from medpipe.io import Geometry, read_image
from medpipe.planning.plans import IntensityProperties
from medpipe.preprocessing import (
    CaseProperties,
    PreprocessingPlan,
    coarse_axis,
    crop_to_nonzero,
    is_preprocessed,
    load_preprocessed,
    normalise,
    preprocess_dataset,
    preprocess_images,
    resample_label,
    restore_label,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def zscore_plan(spacing) -> PreprocessingPlan:
    return PreprocessingPlan(
        spacing=tuple(spacing),
        normalization_schemes=("ZScoreNormalization",),
        use_mask_for_norm=(True,),
        intensity_properties={},
    )


def brain_like_case(shape=(40, 36, 30), spacing=(1.0, 1.2, 3.5)):
    """A zero-padded ellipsoid 'brain' with two nested labels, on an oblique grid."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.7, 0.6, 0.5])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.int16)
    label[radius < 1.0] = 1
    label[radius < 0.55] = 2
    rng = np.random.default_rng(0)
    image = np.where(label > 0, 100.0 + 50 * label + rng.normal(0, 5, shape), 0.0)
    geometry = Geometry(spacing, oblique_geometry(4).origin, oblique_geometry(4).direction)
    return image[None].astype(np.float32), label, geometry


def test_crop_keeps_the_nonzero_box_and_fills_holes():
    images = np.zeros((2, 10, 10, 10), np.float32)
    images[0, 2:8, 3:7, 4:9] = 1.0
    images[0, 4, 4, 5] = 0.0  # a hole inside stays inside the mask
    images[1, 1, 5, 5] = 2.0  # any channel counts
    cropped = crop_to_nonzero(images, np.zeros((10, 10, 10), np.int16))
    assert cropped.bbox == ((1, 8), (3, 7), (4, 9))
    assert cropped.images.shape == (2, 7, 4, 5)
    assert cropped.mask[3, 1, 1]


def test_masked_zscore_uses_only_the_mask_and_zeroes_outside():
    image = np.array([[[[0.0, 0.0, 2.0, 4.0, 6.0]]]], np.float32)
    mask = image[0] != 0
    out = normalise(image, mask, ["ZScoreNormalization"], [True], {})
    values = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(out[0][mask], (values - values.mean()) / values.std(), rtol=1e-6)
    assert np.all(out[0][~mask] == 0)


def test_ct_normalisation_clips_then_uses_dataset_statistics():
    image = np.array([[[[-2000.0, 0.0, 40.0, 3000.0]]]], np.float32)
    props = {"0": IntensityProperties(percentile_00_5=-100.0, percentile_99_5=200.0, mean=50.0,
                                      std=25.0, median=40.0, min=-1000.0, max=3000.0)}
    out = normalise(image, np.ones((1, 1, 4), bool), ["CTNormalization"], [False], props)
    np.testing.assert_allclose(out[0, 0, 0], [-6.0, -2.0, -0.4, 6.0])


def test_anisotropic_data_is_resampled_with_a_separate_coarse_axis():
    assert coarse_axis((0.8, 0.8, 5.0), (0.8, 0.8, 3.0)) == 2
    assert coarse_axis((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) is None
    label = np.zeros((20, 20, 6), np.int16)
    label[5:15, 5:15, 2:4] = 3
    resampled = resample_label(label, (30, 30, 10), separate_axis=2)
    assert set(np.unique(resampled)) <= {0, 3}  # no new label values


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize(("shape", "new_shape"), [((31, 40, 17), (12, 57, 17)),
                                                  ((9, 8, 7), (30, 5, 21))])
def test_resize_gives_scipy_zoom_s_answer(order, shape, new_shape):
    """resize multiplies per-axis matrices instead of zooming the volume: it must equal
    zoom itself, at its boundaries, and with a coarse axis done by nearest neighbour."""
    from scipy.ndimage import zoom

    from medpipe.preprocessing.resampling import resize

    array = np.random.default_rng(order).normal(size=shape)
    factors = [n / o for n, o in zip(new_shape, shape, strict=True)]
    expected = zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(resize(array, new_shape, order, None), expected, atol=1e-12)
    in_plane = zoom(array, [factors[0], factors[1], 1.0], order=order, mode="nearest",
                    grid_mode=True)
    expected = zoom(in_plane, [1.0, 1.0, factors[2]], order=0, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(resize(array, new_shape, order, 2), expected, atol=1e-12)
    assert resize(array.astype(np.float32), new_shape, order, None).dtype == np.float32


@pytest.mark.parametrize("target", [(1.0, 1.2, 3.5), (1.5, 1.5, 1.5), (0.8, 0.8, 2.0)])
def test_round_trip_to_the_raw_grid(target):
    images, label, geometry = brain_like_case()
    data, seg, properties = preprocess_images(images, geometry, zscore_plan(target), label)
    assert seg.shape == data.shape[1:] == properties.shape_after_resampling
    restored = restore_label(seg, properties)
    assert restored.shape == label.shape
    assert restored.geometry == geometry
    assert set(np.unique(restored.array)) <= {0, 1, 2}
    minimum = 1.0 if target == (1.0, 1.2, 3.5) else 0.95
    for value in (1, 2):
        assert dice(restored.array == value, label == value) >= minimum, (target, value)


def test_preprocess_dataset_is_resumable_and_round_trips_demo_like_data(tmp_path):
    root = make_dataset(tmp_path / "raw", n_cases=3, shape=(16, 14, 12))
    dataset = load_dataset(root)
    plan = zscore_plan((2.0, 2.0, 2.0))
    out = tmp_path / "pre"
    assert preprocess_dataset(dataset.training, plan, out, classes=[1, 2]) == [
        "case_000",
        "case_001",
        "case_002",
    ]
    before = (out / "case_001.npz").stat().st_mtime_ns
    (out / "case_002.json").unlink()  # as if killed between the arrays and the properties
    (out / ".case_000.npz.tmp.npz").write_bytes(b"partial")
    assert not is_preprocessed(out, "case_002")
    assert preprocess_dataset(dataset.training, plan, out, classes=[1, 2], workers=2) == [
        "case_002"
    ]
    assert (out / "case_001.npz").stat().st_mtime_ns == before

    case = load_preprocessed(out, "case_000")
    assert case.data.dtype == np.float32 and case.seg.dtype == np.int8
    assert case.seg.shape == case.data.shape[1:]
    locations = case.properties.class_locations
    assert set(locations) == {1, 2}
    assert np.all(case.seg[tuple(locations[2].T)] == 2)
    assert np.all(case.seg[tuple(locations[1].T)] == 1)
    raw_label = read_image(dataset.training[0].label)
    restored = restore_label(case.seg, case.properties)
    assert restored.shape == raw_label.shape
    assert restored.geometry.is_close(raw_label.geometry, atol=1e-9)
    # the properties file is plain JSON (no pickle) and reads back to the same properties
    stored = json.loads((out / "case_000.json").read_text())
    assert stored["case_id"] == "case_000" and set(stored["class_locations"]) == {"1", "2"}
    again = CaseProperties.from_json(stored)
    assert again.geometry == case.properties.geometry
    assert again.bbox_used_for_cropping == case.properties.bbox_used_for_cropping
    np.testing.assert_array_equal(again.class_locations[2], locations[2])
