"""Raw datasets: layout, integrity checks, cross-validation splits and the demo dataset."""

from medpipe.data.layout import Case, DatasetSpec, RawDataset, load_dataset
from medpipe.data.splits import make_splits, read_splits, write_splits

__all__ = [
    "Case",
    "DatasetSpec",
    "RawDataset",
    "load_dataset",
    "make_splits",
    "read_splits",
    "write_splits",
]
