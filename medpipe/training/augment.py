"""nnU-Net v2's data augmentation, built from nnU-Net's own transform library.

`batchgeneratorsv2` (the package nnU-Net v2 trains with) supplies every transform; this
module sets them as `nnUNetTrainer.get_training_transforms` and
`configure_rotation_dummyDA_mirroring_and_inital_patch_size` do (nnU-Net v2.5-2.6):

- the sampler cuts a larger patch (`Augmenter.input_size`: the patch rotated by the largest
  angle about each axis, divided by 0.85) and the spatial transform takes the final patch
  from its centre after rotating (+-30 deg, p 0.2; +-180 deg in-plane for anisotropic
  patches, "dummy 2D") and scaling (0.7-1.4, one factor for all axes, p 0.2), so rotated
  corners hold image, not zero padding;
- Gaussian noise (variance 0-0.1, p 0.1), Gaussian blur (sigma 0.5-1, p 0.2, half of the
  channels), multiplicative brightness and contrast (0.75-1.25, p 0.15 each), low-resolution
  simulation (0.5-1, p 0.25), gamma on the inverted image (0.7-1.5, p 0.1) and on the image
  (p 0.3), both keeping mean and spread, mirroring on each axis (p 0.5).

Labels outside the sampled box are -1 during the spatial transform and 0 after, as in
nnU-Net. Deep-supervision targets are made by the loss (`SegmentationTask`), not here.
Left out: nnU-Net's masking of the image outside the nonzero mask (`MaskImageTransform`),
which acts only on labels that preprocessing set to -1; medpipe's preprocessing writes 0.

The transforms draw from numpy's and torch's global generators; `Augmenter` seeds both per
sample inside a saved-and-restored state, so every sample is replayable and nothing else's
randomness moves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from batchgenerators.augmentations.utils import rotate_coords_3d
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import (
    Convert2DTo3DTransform,
    Convert3DTo2DTransform,
)
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

# nnU-Net's ANISO_THRESHOLD: a patch whose longest side exceeds 3x its first is augmented
# in-plane only ("dummy 2D")
ANISOTROPY_THRESHOLD = 3.0
# the scale nnU-Net divides the rotated extent by when sizing the larger patch (its
# comment: "doesn't even use the correct scale range", kept for compatibility)
INPUT_SIZE_SCALE = 0.85


def is_dummy_2d(patch_size: Sequence[int]) -> bool:
    return max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD


def rotation_range(patch_size: Sequence[int]) -> tuple[float, float]:
    degrees = 180.0 if is_dummy_2d(patch_size) else 30.0
    return (-math.radians(degrees), math.radians(degrees))


def input_size(patch_size: Sequence[int]) -> tuple[int, ...]:
    """The patch the sampler cuts before augmentation: as nnU-Net's `get_patch_size`, the
    patch's corner rotated by the largest angle (at most 90 deg) about each axis in turn,
    the largest extent per axis, divided by 0.85; the first axis unchanged for dummy 2D."""
    angle = min(max(abs(a) for a in rotation_range(patch_size)), math.pi / 2)
    corner = np.asarray(patch_size, dtype=float)
    extent = corner.copy()
    for angles in ((angle, 0, 0), (0, angle, 0), (0, 0, angle)):
        extent = np.maximum(extent, np.abs(rotate_coords_3d(corner, *angles)))
    size = (extent / INPUT_SIZE_SCALE).astype(int)
    if is_dummy_2d(patch_size):
        size[0] = patch_size[0]
    return tuple(int(s) for s in size)


def nnunet_augmentation(patch_size: Sequence[int],
                        mirror_axes: Sequence[int] = (0, 1, 2)) -> BasicTransform:
    """nnU-Net v2's training transforms for this (final) patch size."""
    dummy_2d = is_dummy_2d(patch_size)
    spatial = SpatialTransform(
        tuple(patch_size[1:]) if dummy_2d else tuple(patch_size),
        patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=0.2, rotation=rotation_range(patch_size), p_scaling=0.2,
        scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1,
    )
    spatial_steps = ([Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()]
                     if dummy_2d else [spatial])
    return ComposeTransforms([
        *spatial_steps,
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True),
                        apply_probability=0.1),
        # nnU-Net sets benchmark=True: it times FFT against direct convolution and keeps the
        # faster, the same blur up to rounding; which wins depends on the machine's load, so
        # samples would not replay bit for bit: direct convolution always
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5,
                                              benchmark=False),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
            p_per_channel=1), apply_probability=0.15),
        RandomTransform(ContrastTransform(
            contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
            synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(
            scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
            ignore_axes=(0,) if dummy_2d else None, allowed_channels=None, p_per_channel=0.5),
            apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1,
                                       synchronize_channels=False, p_per_channel=1,
                                       p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1,
                                       p_retain_stats=1), apply_probability=0.3),
        *([MirrorTransform(allowed_axes=tuple(mirror_axes))] if mirror_axes else []),
        RemoveLabelTansform(-1, 0),
    ])


class Augmenter:
    """nnU-Net's chain for one patch size, applied with a given seed (replayable).

    `input_size` is what the sampler must cut; the output has the final patch size."""

    def __init__(self, patch_size: Sequence[int], mirror_axes: Sequence[int] = (0, 1, 2)):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.input_size = input_size(self.patch_size)
        self.transforms = nnunet_augmentation(self.patch_size, mirror_axes)

    def __call__(self, sample: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        with _seeded(seed):
            out = self.transforms(image=sample["image"].float(),
                                  segmentation=sample["label"].to(torch.int16))
        return {"image": out["image"].float().contiguous(),
                "label": out["segmentation"].long().contiguous()}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """numpy's and torch's global generators seeded with SEED, restored afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)
