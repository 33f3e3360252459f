"""Datasets whose every sample is a pure function of (seed, epoch, index).

Segmentation patches and registration pairs are both drawn this way, so resuming at an
epoch boundary replays exactly the samples an uninterrupted run would have drawn, with any
number of loader workers, and no sampler state needs to be checkpointed.

The loader is built once per run (`EpochLoader`) and its worker processes live as long as
it does (`persistent_workers`): the epoch travels with each sample's key, (epoch, index),
from the sampler in the training process, so workers need not be restarted to learn it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, Dataset, Sampler

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

    def __getitem__(self, key: int | tuple[int, int]):
        """KEY is (epoch, index), as `EpochBatches` yields it, or an index of the epoch
        last set."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.sample(epoch, index)

    def sample(self, epoch: int, index: int):
        raise NotImplementedError

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


class EpochBatches(Sampler):
    """One rank's batches of the epoch set last, as lists of (epoch, index) keys."""

    def __init__(self, iterations: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.batches = rank_batches(iterations, batch_size, rank, world_size)
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """A run's one DataLoader over an `EpochDataset`: workers started once and kept
    (`persistent_workers`), batches pinned for non-blocking copies to a GPU."""

    def __init__(self, dataset: EpochDataset, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.sampler = EpochBatches(dataset.iterations, dataset.batch_size, rank, world_size)
        self.key = (rank, world_size)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, persistent_workers=num_workers > 0)

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.epoch = epoch
        return self.loader
