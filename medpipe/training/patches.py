"""Training patches from preprocessed cases, sampled the way nnU-Net samples them.

Every patch is a pure function of (seed, epoch, index) (see `medpipe.sampling`): its case,
position and augmentation come from a random generator seeded with those three numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medpipe.errors import DatasetError
from medpipe.preprocessing import PreprocessedCase
from medpipe.sampling import EpochDataset
from medpipe.training.augment import Augmenter
from medpipe.training.augment_device import DeviceAugmenter, draw_parameters


def do_oversample(index_in_batch: int, batch_size: int, fraction: float) -> bool:
    """nnU-Net's rule: the last `round(batch_size * fraction)` samples of a batch are forced
    to contain foreground (at least one sample when the fraction is positive)."""
    return index_in_batch >= round(batch_size * (1.0 - fraction))


def patch_origin(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    centre: Sequence[int] | None = None,
    final_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Lower corner of a patch, by nnU-Net's `get_bbox`: the box may leave the image by
    PATCH - FINAL_SIZE in all (the larger patch augmentation cuts before rotating; split
    over both sides), or by as much as makes up for an image smaller than the patch (such
    cases are padded). Uniform over those positions, or centred on CENTRE (a foreground
    voxel), then only kept above the lower bound, as nnU-Net keeps it, so the voxel stays
    at the centre of the final patch."""
    shape, patch = np.asarray(shape), np.asarray(patch_size)
    pad = patch - (patch if final_size is None else np.asarray(final_size))
    pad = np.where(pad + shape < patch, patch - shape, pad)
    low = -(pad // 2)
    high = shape + pad // 2 + pad % 2 - patch
    if centre is None:
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high, strict=True)])
    return np.maximum(np.asarray(centre) - patch // 2, low)


def crop_patch(array: np.ndarray, origin: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """array[..., origin:origin+patch] with zero padding wherever the box leaves the array."""
    spatial = array.shape[-3:]
    out = np.zeros((*array.shape[:-3], *patch_size), dtype=array.dtype)
    src, dst = [], []
    for o, p, s in zip(origin, patch_size, spatial, strict=True):
        lo, hi = max(o, 0), min(o + p, s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchDataset(EpochDataset):
    """Patches sampled as nnU-Net samples them."""

    def __init__(
        self,
        cases: Sequence[PreprocessedCase],
        patch_size: Sequence[int],
        batch_size: int,
        iterations: int,
        seed: int,
        oversample_foreground: float = 0.33,
        augment: Augmenter | DeviceAugmenter | None = None,
    ) -> None:
        """AUGMENT: an `Augmenter` augments each patch here; a `DeviceAugmenter` leaves it to
        the training device, which gets the larger patch and the drawn `parameters`."""
        if not cases:
            raise DatasetError("no training cases for this fold")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.iterations = iterations
        self.seed = seed
        self.oversample_foreground = oversample_foreground
        self.augment = augment

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, index])
        case = self.cases[rng.integers(len(self.cases))]
        centre = None
        if do_oversample(index % self.batch_size, self.batch_size, self.oversample_foreground):
            centre = self._foreground_voxel(case, rng)
        # augmentation cuts a larger patch and returns the final one from its centre
        size = self.augment.input_size if self.augment is not None else self.patch_size
        origin = patch_origin(case.seg.shape, size, rng, centre, final_size=self.patch_size)
        sample = {
            "image": torch.from_numpy(crop_patch(case.data, origin, size)),
            "label": torch.from_numpy(crop_patch(case.seg[None], origin, size).astype(np.int64)),
        }
        if isinstance(self.augment, DeviceAugmenter):
            sample["parameters"] = draw_parameters(rng, len(case.data), self.patch_size)
        elif self.augment is not None:
            sample = self.augment(sample, int(rng.integers(2**31)))
        return sample

    @staticmethod
    def _foreground_voxel(case: PreprocessedCase,
                          rng: np.random.Generator) -> np.ndarray | None:
        """A random voxel of a random foreground class present in the case (nnU-Net picks
        the class first, so small structures are seen as often as large ones)."""
        locations = case.properties.class_locations or {}
        present = [v for v, points in locations.items() if v != 0 and len(points)]
        if not present:
            return None
        points = locations[present[rng.integers(len(present))]]
        return points[rng.integers(len(points))]
