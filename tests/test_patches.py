"""Patch sampling: nnU-Net's foreground oversampling, padding, and replayable randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpipe.io import Geometry
from medpipe.preprocessing import CaseProperties, PreprocessedCase
from medpipe.training.augment import Augmenter
from medpipe.training.patches import (
    PatchDataset,
    crop_patch,
    do_oversample,
    patch_origin,
)


def small_case(seed: int = 0, shape=(30, 26, 20)) -> PreprocessedCase:
    """Mostly background with one small foreground cube: random patches rarely hit it."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int8)
    seg[3:6, 4:7, 2:5] = 2
    data = rng.normal(size=(1, *shape)).astype(np.float32)
    locations = {2: np.argwhere(seg == 2)}
    properties = CaseProperties(
        geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), shape_before_cropping=shape,
        bbox_used_for_cropping=tuple((0, n) for n in shape),
        shape_after_cropping_and_before_resampling=shape, spacing_before_resampling=(1, 1, 1),
        spacing=(1, 1, 1), shape_after_resampling=shape, separate_axis=None,
        case_id=f"case_{seed}", class_locations=locations)
    return PreprocessedCase(f"case_{seed}", data, seg, properties)


@pytest.mark.parametrize(
    ("batch_size", "forced"), [(2, [False, True]), (3, [False, False, True]), (1, [False])]
)
def test_last_third_of_each_batch_is_forced_to_foreground(batch_size, forced):
    # nnU-Net: a sample is forced when index >= round(batch_size * (1 - 0.33))
    assert [do_oversample(i, batch_size, 0.33) for i in range(batch_size)] == forced


def test_forced_patches_contain_foreground_and_random_ones_mostly_do_not():
    dataset = PatchDataset([small_case()], (8, 8, 8), batch_size=2, iterations=100, seed=0)
    forced = [dataset[i]["label"].max().item() > 0 for i in range(1, 200, 2)]
    free = [dataset[i]["label"].max().item() > 0 for i in range(0, 200, 2)]
    assert all(forced)
    assert sum(free) < 40  # the cube is 27 of 15,600 voxels


def test_every_patch_is_a_function_of_seed_epoch_and_index():
    augmenter = Augmenter((16, 16, 16))
    a = PatchDataset([small_case(0), small_case(1)], (16, 16, 16), 2, 4, seed=7,
                     augment=augmenter)
    b = PatchDataset([small_case(0), small_case(1)], (16, 16, 16), 2, 4, seed=7,
                     augment=Augmenter((16, 16, 16)))
    a.set_epoch(3)
    b.set_epoch(3)
    for index in (5, 0, 5):  # order of access does not matter
        assert torch.equal(a[index]["image"], b[index]["image"])
        assert torch.equal(a[index]["label"], b[index]["label"])
    b.set_epoch(4)
    assert not torch.equal(a[5]["image"], b[5]["image"])


def test_one_loader_keeps_its_workers_and_gives_them_each_epoch():
    """The run's loader starts its worker once: the epoch reaches it with every key, so
    epoch 1 through the kept worker equals epoch 1 drawn in this process."""
    from medpipe.sampling import EpochLoader

    dataset = PatchDataset([small_case(0), small_case(1)], (16, 16, 16), 2, 3, seed=7,
                           augment=Augmenter((16, 16, 16)))
    loader = EpochLoader(dataset, num_workers=1)
    first = list(loader.epoch(0))
    workers = [w.pid for w in loader.loader._iterator._workers]
    second = list(loader.epoch(1))
    assert [w.pid for w in loader.loader._iterator._workers] == workers  # the same process
    dataset.set_epoch(1)
    for step, batch in enumerate(second):
        expected = torch.stack([dataset[i]["image"] for i in range(2 * step, 2 * step + 2)])
        assert torch.equal(batch["image"], expected)
    assert not torch.equal(first[0]["image"], second[0]["image"])


def test_augmentation_keeps_labels_integer_and_shapes():
    augmenter = Augmenter((16, 16, 16))
    assert augmenter.input_size == (25, 25, 25)  # cut larger, the final patch from its centre
    dataset = PatchDataset([small_case()], (16, 16, 16), 2, 20, seed=0, augment=augmenter)
    for index in range(40):
        sample = dataset[index]
        assert sample["image"].shape == (1, 16, 16, 16)
        assert sample["image"].dtype == torch.float32
        assert sample["label"].dtype == torch.int64
        assert set(sample["label"].unique().tolist()) <= {0, 2}


def test_crop_pads_with_zeros_outside_the_array():
    array = np.arange(1, 1 + 4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    patch = crop_patch(array, (-2, 1, 3), (6, 3, 5))
    expected = np.pad(array, ((0, 0), (2, 0), (0, 0), (0, 2)))[:, 0:6, 1:4, 3:8]
    np.testing.assert_array_equal(patch, expected)


def test_small_images_keep_at_least_half_the_patch_inside():
    rng = np.random.default_rng(0)
    shape, patch = np.array([10, 40, 6]), np.array([16, 16, 16])
    for _ in range(200):
        origin = patch_origin(shape, patch, rng)
        inside = np.minimum(origin + patch, shape) - np.maximum(origin, 0)
        assert np.all(inside >= np.minimum(shape, patch // 2))
        assert np.all(origin[1] >= 0) and origin[1] + 16 <= 40


def test_a_forced_patch_keeps_its_foreground_voxel_at_the_centre_near_borders_too():
    # nnU-Net's get_bbox clips a centred box only below: a voxel near the upper border stays
    # at the centre of the (larger) box, whose overhang is padded
    rng = np.random.default_rng(0)
    origin = patch_origin((30, 26, 20), (25, 25, 25), rng, centre=(29, 13, 19),
                          final_size=(16, 16, 16))
    assert origin.tolist() == [29 - 12, 13 - 12, 19 - 12]
    low = patch_origin((30, 26, 20), (25, 25, 25), rng, centre=(0, 0, 0), final_size=(16, 16, 16))
    assert low.tolist() == [-4, -4, -4]  # the lower bound: half of 25 - 16 may hang over
