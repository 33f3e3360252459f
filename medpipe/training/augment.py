"""nnU-Net's default data augmentation, built from MONAI's dictionary transforms.

Probabilities and ranges follow nnU-Net v2's `nnUNetTrainer.get_training_transforms`:
rotation +-30 deg and scaling (p=0.2 each; 0.7-1.3, as MONAI ranges are symmetric, where
nnU-Net uses 0.7-1.4), Gaussian noise (p=0.1), Gaussian blur
(p=0.2), multiplicative brightness 0.75-1.25 (p=0.15), contrast 0.75-1.25 (p=0.15),
low-resolution simulation 0.5-1 (p=0.25), gamma 0.7-1.5 (p=0.3), mirroring per axis (p=0.5).
Spatial transforms move image and label together (label by nearest neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

KEYS = ("image", "label")


def nnunet_augmentation(mirror_axes: Sequence[int] = (0, 1, 2)) -> Compose:
    """The transform chain; its randomness is re-seeded per sample by `Augmenter`."""
    return Compose(
        [
            RandAffined(
                KEYS,
                prob=0.2,
                rotate_range=(math.pi / 6,) * 3,
                scale_range=(0.3,) * 3,  # MONAI scales by 1 + U(-0.3, 0.3)
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandGaussianNoised("image", prob=0.1, std=0.1),
            RandGaussianSmoothd(
                "image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
            ),
            RandScaleIntensityd("image", factors=0.25, prob=0.15),
            RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15, preserve_range=True),
            RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
            *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in mirror_axes),
        ]
    )


class Augmenter:
    """Applies the chain with a given seed, so each sample's augmentation is replayable."""

    def __init__(self, transforms: Compose | None = None) -> None:
        self.transforms = transforms if transforms is not None else nnunet_augmentation()

    def __call__(self, sample: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        self.transforms.set_random_state(seed=seed)
        out = self.transforms(dict(sample))
        return {
            "image": _plain(out["image"]).float(),
            "label": _plain(out["label"]).round().long(),
        }


def _plain(tensor) -> torch.Tensor:
    """MONAI returns MetaTensors; the training loop wants plain tensors (cheaper to collate)."""
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if as_tensor else torch.as_tensor(tensor)
