"""Checkpoints: state_dicts in `NAME.pt`, plain JSON metadata in `NAME.json`.

The `.pt` file holds only tensors and containers of numbers, so it loads with
`torch.load(..., weights_only=True)`; everything a person or another tool reads (epoch,
scores, history, the model's construction arguments) is in the JSON beside it, written
after the weights: a checkpoint whose JSON is missing is incomplete and ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medpipe.errors import MedpipeError
from medpipe.io import atomic_output, write_json


def save_checkpoint(folder: Path, name: str, state: dict[str, Any], metadata: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").unlink(missing_ok=True)  # invalid until the new JSON lands
    with atomic_output(folder / f"{name}.pt") as staging:
        torch.save(state, staging)
    write_json(metadata, folder / f"{name}.json")
    return folder / f"{name}.pt"


def checkpoint_exists(folder: Path, name: str) -> bool:
    return (folder / f"{name}.pt").is_file() and (folder / f"{name}.json").is_file()


def load_checkpoint(
    folder: Path, name: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict]:
    """(state, metadata); weights_only=True, so a checkpoint can never run code."""
    weights, meta = folder / f"{name}.pt", folder / f"{name}.json"
    if not (weights.is_file() and meta.is_file()):
        raise MedpipeError(f"checkpoint {name!r} is missing or incomplete", folder)
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
        metadata = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        raise MedpipeError(f"cannot read checkpoint: {error}", weights) from None
    return state, metadata
