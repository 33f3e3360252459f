"""Registration on the shared engine: the task (pairs, loss, validation) and
`train_registration`, which turns a config, a network name and a fold into a run folder.

The loss is VoxelMorph's (`registration.loss`, shared with instance optimisation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medpipe.config import PipelineConfig
from medpipe.data.layout import scan_dataset
from medpipe.data.splits import fold_case_ids
from medpipe.device import loader_workers, pick_device
from medpipe.errors import MedpipeError
from medpipe.figures import plot_registration
from medpipe.io import write_json
from medpipe.metrics import deformation_metrics, dice_per_class
from medpipe.models import NetworkShape, build_model, model_spec
from medpipe.registration.loss import RegistrationLoss, symmetric_batch
from medpipe.registration.pairs import (
    PairDataset,
    RegistrationCase,
    evaluation_pairs,
    load_registration_cases,
    onto_fixed_grid,
    padded_shape,
    pair_arrays,
    pair_matrix,
    prealign,
    resample_case,
)
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import RegistrationRunSpec
from medpipe.sampling import EpochLoader
from medpipe.spatial import warp
from medpipe.training.distributed import ONE_PROCESS, Processes, start, wait_for_main
from medpipe.training.runs import (
    RunSetup,
    common_fields,
    fit_run,
    model_plans,
    prepare_run_folder,
)


@dataclass(frozen=True)
class ValidationPair:
    """A held-out pair on the fixed case's padded grid (`pair_arrays`)."""

    moving_id: str
    fixed_id: str
    shape: tuple[int, int, int]  # the fixed grid, unpadded
    arrays: dict[str, np.ndarray]


class RegistrationTask:
    """Pairs in, similarity + smoothness (+ Dice) out; validation scores held-out pairs by
    the Dice of nearest-neighbour-warped labels on the fixed grid."""

    unit = "pairs"

    def __init__(self, dataset: PairDataset, validation: Sequence[ValidationPair],
                 loss: RegistrationLoss, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.validation = list(validation)
        self.loss_function = loss
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.loader: EpochLoader | None = None
        self.example: dict[str, Any] | None = None

    def batches(self, epoch: int, processes: Processes = ONE_PROCESS) -> DataLoader:
        """The run's one loader (workers kept between epochs), set to EPOCH."""
        key = (processes.rank, processes.world_size)
        if self.loader is None or self.loader.key != key:
            self.loader = EpochLoader(self.dataset, *key, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory)
        return self.loader.epoch(epoch)

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        moving, fixed, moving_labels, fixed_labels, voxel_maps, labelled = (
            batch[name].to(device, non_blocking=True) for name in
            ("moving", "fixed", "moving_labels", "fixed_labels", "voxel_map", "labelled"))
        # the whole batch onto its fixed grids at once, on the device (the loader only pads)
        moving, moving_labels = onto_fixed_grid(moving, moving_labels, voxel_maps)
        tensors = moving, fixed, moving_labels, fixed_labels
        pairs = len(tensors[0])
        if self.loss_function.inverse_consistency > 0:  # every pair both ways
            tensors = symmetric_batch(*tensors)
            labelled = torch.cat([labelled, labelled])
        moving, fixed, moving_labels, fixed_labels = tensors
        warped, ddf, global_ddf = model(moving, fixed, parts=True)
        return (self.loss_function(warped, fixed, ddf, moving_labels, fixed_labels, labelled,
                                   global_ddf), pairs)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        per_pair, folding = [], []
        for index, pair in enumerate(self.validation):
            arrays = pair.arrays
            moving = torch.from_numpy(arrays["moving"])[None].to(device)
            fixed = torch.from_numpy(arrays["fixed"])[None].to(device)
            warped, ddf = model(moving, fixed)
            ddf = ddf.float()
            labels = torch.from_numpy(arrays["moving_labels"])[None].to(device).float()
            moved = warp(labels, ddf, mode="nearest")[0, 0].round().long().cpu()
            region = tuple(slice(0, n) for n in pair.shape)  # the fixed grid, unpadded
            reference = torch.from_numpy(arrays["fixed_labels"][0])
            n_classes = self.loss_function.n_classes
            per_pair.append(dice_per_class(moved[region], reference[region], n_classes))
            field = ddf[0].cpu().numpy()[(slice(None), *region)]
            folding.append(deformation_metrics(field)["folding_percent"])
            if index == 0:
                self.example = {
                    "title": f"{pair.moving_id} -> {pair.fixed_id}",
                    "fixed": arrays["fixed"][0][region], "moving": arrays["moving"][0][region],
                    "warped": warped[0, 0].float().cpu().numpy()[region], "ddf": field,
                }
        dice = torch.nanmean(torch.stack(per_pair), dim=0).tolist()
        metrics = {f"dice_{c}": d for c, d in enumerate(dice, start=1)}
        metrics["folding_percent"] = float(np.mean(folding))
        metrics["score"] = float(np.nanmean(dice)) if not all(map(math.isnan, dice)) else math.nan
        return metrics

    def write_figures(self, folder: Path) -> list[Path]:
        if self.example is None:
            return []
        e = self.example
        return [plot_registration(e["fixed"], e["moving"], e["warped"], e["ddf"],
                                  folder / "validation_registration.png", title=e["title"])]


# --------------------------------------------------------------------------- the entry point


def train_registration(
    config: PipelineConfig,
    model: str,
    fold: int,
    run_dir: Path | None = None,
    restart: bool = False,
    progress: bool = True,
    restart_if_changed: bool = False,
    processes: Processes = ONE_PROCESS,
) -> Path:
    """Train a registration network on FOLD's training cases (as one of PROCESSES:
    `training.distributed`); resumes in the same folder."""
    return fit_run(config, registration_setup(config, model, fold, run_dir, restart,
                                           restart_if_changed, processes), progress)


def registration_setup(config: PipelineConfig, model: str, fold: int,
                       run_dir: Path | None = None, restart: bool = False,
                       restart_if_changed: bool = False,
                       processes: Processes = ONE_PROCESS) -> RunSetup:
    """The described run folder with its pre-alignment, the network, the pair task and the
    device: what `train_registration` fits, and what benchmarks time."""
    spec_of_model = model_spec(model, task="registration")
    training = config.training_for(model)
    plans = model_plans(config, model)
    train_ids, val_ids = fold_case_ids(config.splits_file, fold)
    settings = config.registration.network_settings()
    if settings.atlas is not None and settings.atlas not in (*train_ids, *val_ids):
        raise MedpipeError(f"atlas {settings.atlas!r} is not a training case of the dataset")
    unlabelled_ids = unlabelled_scans(config) if settings.unlabelled else []
    preprocessed = (load_registration_cases(config.preprocessed_dir, [*train_ids, *val_ids])
                    + load_registration_cases(config.preprocessed_dir, unlabelled_ids,
                                              labelled=False))
    cases = [resample_case(c, settings.spacing) for c in preprocessed]
    shape = NetworkShape(plans.in_channels, 3)
    divisor = spec_of_model.patch_divisor(shape, config.model_options(model))
    training = training.within_budget(training.batch_size or 1)
    spec = RegistrationRunSpec(
        **common_fields(config, plans, model, fold, training),
        batch_size=training.batch_size or 1,  # VoxelMorph trains on one pair at a time
        registration=settings,
        classical=config.registration.classical.model_copy(update={"deformable": "none"}),
        grid_shape=padded_shape([c.shape for c in cases], divisor),
        reference_case=settings.atlas or train_ids[0],
        unlabelled_cases=tuple(unlabelled_ids),
    )
    folder = RunFolder(run_dir) if run_dir else config.run_folder(model, fold)
    device = start(processes, pick_device(training.device))
    if processes.is_main:  # the others read what it writes
        prepare_run_folder(config, plans, folder, spec, restart, restart_if_changed)
        prealignment(folder, spec, preprocessed)
    wait_for_main(processes)
    matrices = prealignment(folder, spec, preprocessed)  # stored: read back

    torch.manual_seed(training.seed)
    network = build_model(model, spec.network_shape, spec.model_options)
    by_id = {case.case_id: case for case in cases}
    atlas_id = settings.atlas
    dataset = PairDataset(
        [by_id[i] for i in (*spec.train_cases, *spec.unlabelled_cases)], matrices,
        spec.grid_shape,
        spec.batch_size, training.iterations_per_epoch, training.seed,
        atlas=by_id[atlas_id] if atlas_id else None,
    )
    pairs = evaluation_pairs(spec.val_cases, atlas_id, settings.val_pairs)
    if not pairs:
        raise MedpipeError(
            f"fold {fold} has fewer than two validation cases, so no held-out pair to "
            "validate on; register to an atlas (--atlas CASE_ID) or use fewer folds",
            config.splits_file)
    validation = [
        ValidationPair(m, f, by_id[f].shape,
                       pair_arrays(by_id[m], by_id[f], pair_matrix(matrices, m, f),
                                   spec.grid_shape))
        for m, f in pairs
    ]
    loss = RegistrationLoss(settings, n_classes=len(spec.labels),
                            inverse_consistency=spec.model_options.inverse_consistency)
    task = RegistrationTask(dataset, validation, loss,
                            num_workers=loader_workers(training.num_workers, device),
                            pin_memory=device.type == "cuda")
    return RunSetup(folder, spec, plans, network, task, device, processes)


def unlabelled_scans(config: PipelineConfig) -> list[str]:
    """The dataset's unlabelled training scans (imagesTrUnlabelled), by case id."""
    dataset, _ = scan_dataset(config.dataset)
    return [case.case_id for case in dataset.unlabelled]


def prealignment(folder: RunFolder, spec: RegistrationRunSpec,
                 cases: Sequence[RegistrationCase]) -> dict[str, list] | None:
    """The per-case affines to the reference case, computed once and kept in the run folder
    (the evaluation reuses them); None when the run does not pre-align."""
    if spec.registration.prealign == "none":
        return None
    stored = read_prealignment(folder, spec)
    if stored is not None:
        return stored
    reference = next(c for c in cases if c.case_id == spec.reference_case)
    matrices = prealign(cases, reference, spec.classical, spec.registration.prealign)
    write_json({"run_hash": spec.run_hash, "reference": reference.case_id,
                "matrices": matrices}, folder.prealignment_file)
    return matrices


def read_prealignment(folder: RunFolder, spec: RegistrationRunSpec) -> dict[str, list] | None:
    """The stored affines when they belong to this run (same settings and data), else None."""
    path = folder.prealignment_file
    if not path.is_file():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    return stored["matrices"] if stored.get("run_hash") == spec.run_hash else None
