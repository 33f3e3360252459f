"""A trained network from its run folder: `model.json` says how to build it, the checkpoint
holds its weights (loaded with weights_only=True). No architecture file, no pickled class."""

from __future__ import annotations

import json
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
