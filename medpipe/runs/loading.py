"""A trained network from its run folder: `model.json` says how to build it, the checkpoint
holds its weights (loaded with weights_only=True). No architecture file, no pickled class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.models import build_model
from medpipe.planning.plans import Plans, read_plans
from medpipe.runs.checkpoint import load_checkpoint
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import RegistrationRunSpec, SegmentationRunSpec, read_run_spec


def load_trained(
    folder: RunFolder, checkpoint: str = "best", device: torch.device | str = "cpu"
) -> tuple[nn.Module, SegmentationRunSpec | RegistrationRunSpec]:
    """(network in eval mode on DEVICE, its run description)."""
    spec = read_run_spec(folder)
    network = build_model(spec.model, spec.network_shape, spec.model_options)
    state, _ = load_checkpoint(folder.checkpoints, checkpoint, map_location=device)
    try:
        network.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise MedpipeError(f"checkpoint does not fit the model: {str(error)[:200]}",
                           folder.checkpoint_file(checkpoint)) from None
    return network.to(device).eval(), spec


def read_run_plans(folder: RunFolder) -> Plans:
    """The plans stored with a trained run (inference prepares scans with them)."""
    if not folder.plans_file.is_file():
        raise MedpipeError("plans.json is missing from the model folder", folder.path)
    return read_plans(folder.plans_file)


def run_folders(source: str | Path | Sequence[str | Path],
                checkpoint: str = "best") -> list[tuple[RunFolder, str]]:
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
        return [(RunFolder(path.parent.parent), path.stem)]
    if RunFolder(path).holds_run():
        return [(RunFolder(path), checkpoint)]
    folds = sorted(p for p in path.glob("fold_*") if RunFolder(p).holds_run())
    if folds:
        return [(RunFolder(fold), checkpoint) for fold in folds]
    if not path.exists():
        raise MedpipeError("model not found", path)
    raise MedpipeError("not a model folder: no model.json here or in fold_* folders", path)
