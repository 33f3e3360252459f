"""Checkpoints: state_dicts in `NAME.pt`, plain JSON metadata in `NAME.json`.

The `.pt` file holds only tensors and containers of numbers, so it loads with
`torch.load(..., weights_only=True)`; everything a person or another tool reads (epoch,
scores, history, the model's construction arguments) is in the JSON beside it.

The two files change together even when the process is killed at any instant: the new pair
is first written completely as `NAME.next.pt` then `NAME.next.json` (each atomically), and
only then switched into place, weights first. Which `.next` files exist says where a
killed writer stopped:
- `.next.pt` alone: the new pair was never complete; the old pair stands;
- both: the new pair is complete, not yet switched; the old pair stands;
- `.next.json` alone: the weights were switched; the new JSON is `.next.json`.
Readers take the pair that is whole without touching anything; the next writer (the one
holding the run folder's lock) finishes or undoes the switch first (`_recover`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from medpipe.errors import MedpipeError
from medpipe.io import atomic_output, write_json


def save_checkpoint(folder: Path, name: str, state: dict[str, Any], metadata: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _recover(folder, name)
    weights, meta = _next_files(folder, name)
    try:
        with atomic_output(weights) as staging:
            torch.save(state, staging)
        write_json(metadata, meta)
    except OSError as error:
        raise MedpipeError(f"cannot write checkpoint {name!r}: {error.strerror or error}",
                           folder) from None
    _switch(folder, name)
    return folder / f"{name}.pt"


def checkpoint_exists(folder: Path, name: str) -> bool:
    weights, meta = _whole_pair(folder, name)
    return weights.is_file() and meta.is_file()


def _whole_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """The weights and JSON of the last complete checkpoint, read-only."""
    next_weights, next_meta = _next_files(folder, name)
    if next_meta.is_file() and not next_weights.exists():
        return folder / f"{name}.pt", next_meta
    return folder / f"{name}.pt", folder / f"{name}.json"


def _next_files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.next.pt", folder / f"{name}.next.json"


def _switch(folder: Path, name: str) -> None:
    weights, meta = _next_files(folder, name)
    if weights.exists():
        os.replace(weights, folder / f"{name}.pt")
    if meta.exists():
        os.replace(meta, folder / f"{name}.json")


def _recover(folder: Path, name: str) -> None:
    """Finish or undo a switch a killed writer left half done (see the module's doc), and
    remove its staging folders; only a writer calls this (the run folder's lock keeps other
    writers out)."""
    if not folder.is_dir():
        return
    weights, meta = _next_files(folder, name)
    if weights.exists() and not meta.exists():
        weights.unlink()
    elif meta.exists() and not weights.exists():
        _switch(folder, name)
    else:  # both (never switched) or neither: the old pair stands
        meta.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
    for stale in folder.glob(f".{name}.next.*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


def load_checkpoint(
    folder: Path, name: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict]:
    """(state, metadata); weights_only=True, so a checkpoint can never run code."""
    weights, meta = _whole_pair(folder, name)
    if not (weights.is_file() and meta.is_file()):
        raise MedpipeError(f"checkpoint {name!r} is missing or incomplete", folder)
    if weights.stat().st_size == 0:
        raise MedpipeError("cannot read checkpoint: the file is empty (0 bytes)", weights)
    try:
        with warnings.catch_warnings():  # torch's notice about the pickle protocol of a
            # file it is about to refuse (or read) is not the user's concern
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            state = torch.load(weights, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise MedpipeError("refused: the checkpoint holds objects other than tensors and "
                           "numbers, and medpipe never unpickles code", weights) from None
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        raise MedpipeError(f"cannot read checkpoint ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'truncated'})",
                           weights) from None
    try:
        metadata = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedpipeError(f"cannot read checkpoint metadata ({error})", meta) from None
    if not isinstance(state, dict) or not isinstance(metadata, dict):
        raise MedpipeError("not a medpipe checkpoint (expected a mapping of tensors)",
                           weights)
    return state, metadata
