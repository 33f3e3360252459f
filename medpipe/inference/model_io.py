"""A trained network from its run folder: `model.json` says how to build it, the checkpoint
holds its weights (loaded with weights_only=True). No architecture file, no pickled class."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.models import NetworkShape, build_model
from medpipe.training.checkpoint import load_checkpoint


def read_description(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise MedpipeError("not a run folder: model.json is missing", Path(run_dir))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise MedpipeError(f"model.json is not valid JSON ({error})", path) from None


def load_trained(
    run_dir: str | Path, checkpoint: str = "best", device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode on DEVICE, its description)."""
    run_dir = Path(run_dir)
    description = read_description(run_dir)
    shape = NetworkShape(description["in_channels"], description["out_channels"],
                         description.get("architecture", {}))
    network = build_model(description["model"], shape, description["options"])
    state, _ = load_checkpoint(run_dir / "checkpoints", checkpoint, map_location=device)
    try:
        network.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise MedpipeError(f"checkpoint does not fit the model: {str(error)[:200]}",
                           run_dir / "checkpoints" / f"{checkpoint}.pt") from None
    return network.to(device).eval(), description


def run_folders(source: str | Path | Sequence[str | Path],
                checkpoint: str = "best") -> list[tuple[Path, str]]:
    """(run folder, checkpoint name) for each model the SOURCE names: a run folder, a
    checkpoint file, a folder of `fold_K` run folders, a list of these, or an MLflow model
    URI (downloaded, then read like a folder)."""
    if isinstance(source, list | tuple):
        return [member for item in source for member in run_folders(item, checkpoint)]
    if isinstance(source, str) and source.startswith("models:/"):
        from medpipe.tracking import download_model

        return run_folders(download_model(source), checkpoint)
    path = Path(source)
    if path.is_file() and path.suffix == ".pt":  # RUN/checkpoints/NAME.pt
        return [(path.parent.parent, path.stem)]
    if (path / "model.json").is_file():
        return [(path, checkpoint)]
    folds = sorted(p for p in path.glob("fold_*") if (p / "model.json").is_file())
    if folds:
        return [(fold, checkpoint) for fold in folds]
    if not path.exists():
        raise MedpipeError("model not found", path)
    raise MedpipeError("not a model folder: no model.json here or in fold_* folders", path)
