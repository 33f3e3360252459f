"""Datasets whose every sample is a pure function of (seed, epoch, index).

Segmentation patches and registration pairs are both drawn this way, so resuming at an
epoch boundary replays exactly the samples an uninterrupted run would have drawn, with any
number of loader workers, and no sampler state needs to be checkpointed.
"""

from __future__ import annotations

from torch.utils.data import Dataset


class EpochDataset(Dataset):
    """`iterations x batch_size` samples per epoch, each a function of (seed, epoch, index);
    call `set_epoch` before each epoch. Subclasses draw the sample in `__getitem__`."""

    batch_size: int
    iterations: int
    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iterations * self.batch_size
