"""Deterministic k-fold cross-validation splits.

Same rule as nnU-Net v2 (scikit-learn `KFold`, shuffled, seed 12345, over the sorted case
ids) and the same file shape (`[{"train": [...], "val": [...]}, ...]`), so a
`splits.json` written here can be dropped into nnU-Net as `splits_final.json` and
the folds of both tools hold the same cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sklearn.model_selection import KFold

from medpipe.errors import DatasetError
from medpipe.io import write_json

NNUNET_SPLIT_SEED = 12345
Split = dict[str, list[str]]


def make_splits(
    case_ids: Sequence[str], n_folds: int = 5, seed: int = NNUNET_SPLIT_SEED
) -> list[Split]:
    """Train/val case ids per fold; every case is validated exactly once."""
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise DatasetError("case ids must be unique to split them")
    if n_folds < 2 or n_folds > len(ids):
        raise DatasetError(f"cannot make {n_folds} folds from {len(ids)} case(s)")
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(ids)
    return [
        {"train": [ids[i] for i in train], "val": [ids[i] for i in val]} for train, val in folds
    ]


def write_splits(splits: list[Split], path: str | Path) -> Path:
    return write_json(splits, path)


def read_splits(path: str | Path) -> list[Split]:
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read splits ({error})", path) from error
    if not isinstance(splits, list) or not all(
        isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits
    ):
        raise DatasetError("expected a list of {{'train': [...], 'val': [...]}}", path)
    return splits


def fold_cases(splits: list[Split], fold: int) -> Split:
    if not 0 <= fold < len(splits):
        raise DatasetError(f"fold {fold} does not exist; splits have folds 0..{len(splits) - 1}")
    return splits[fold]


def fold_case_ids(splits_file: Path, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of FOLD, with errors that say which step to run."""
    if not splits_file.is_file():
        raise DatasetError("no splits: run `medpipe split` (or the workflow) first", splits_file)
    splits = read_splits(splits_file)
    if not 0 <= fold < len(splits):
        raise DatasetError(f"fold {fold} does not exist; splits have folds 0-{len(splits) - 1}",
                           splits_file)
    split = fold_cases(splits, fold)
    return list(split["train"]), list(split["val"])
