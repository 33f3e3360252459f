"""Datasets whose every sample is a pure function of (seed, epoch, index).

Segmentation patches and registration pairs are both drawn this way, so resuming at an
epoch boundary replays exactly the samples an uninterrupted run would have drawn, with any
number of loader workers, and no sampler state needs to be checkpointed.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from medpipe.errors import MedpipeError


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

    def rank_batches(self, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The epoch's batches as sample indices, rank RANK of WORLD_SIZE's share of each:
        every global batch is the same whatever the number of processes."""
        return rank_batches(self.iterations, self.batch_size, rank, world_size)


def rank_batches(iterations: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> list[list[int]]:
    """Per step, the sample indices rank RANK draws: its contiguous share of the global batch
    `[step * batch_size, (step + 1) * batch_size)` (all of it for one process)."""
    if batch_size % world_size:
        raise MedpipeError(f"a batch of {batch_size} cannot be split evenly over {world_size} "
                           "processes; use a batch size that is a multiple of the process count")
    share = batch_size // world_size
    return [list(range(step * batch_size + rank * share, step * batch_size + (rank + 1) * share))
            for step in range(iterations)]
