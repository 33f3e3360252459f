"""Segmentation on the shared engine: the task (batches, loss, validation) and `train_segmentation`,
which turns a pipeline config, a model name and a fold into a trained run folder
(see `training.runs` for what the folder holds)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from medpipe.config import PipelineConfig
from medpipe.data.labels import REGION_THRESHOLD, LabelScheme
from medpipe.device import loader_workers, pick_device, require_memory
from medpipe.errors import MedpipeError
from medpipe.figures import plot_segmentation_overlay
from medpipe.metrics import dice_per_class, dice_per_region
from medpipe.models import NetworkShape, build_model, fit_patch_size, model_spec
from medpipe.models.sliding_window import predict_probabilities
from medpipe.planning.plans import Plans
from medpipe.preprocessing import PreprocessedCase, load_labelled_cases
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import SegmentationRunSpec
from medpipe.sampling import EpochLoader
from medpipe.training.augment import Augmenter
from medpipe.training.augment_device import DeviceAugmenter
from medpipe.training.augment_device import supports as supports_on_device
from medpipe.training.distributed import ONE_PROCESS, Processes, start, wait_for_main
from medpipe.training.patches import PatchDataset
from medpipe.training.runs import (
    RunSetup,
    common_fields,
    fit_run,
    model_plans,
    prepare_run_folder,
)
from medpipe.training_settings import TrainingConfig


class SegmentationTask:
    """Patches in, Dice + cross-entropy out (deep-supervised when the net returns several)."""

    unit = "patches"

    def __init__(
        self,
        dataset: PatchDataset,
        validation_cases: Sequence[PreprocessedCase],
        labels: LabelScheme,
        batch_dice: bool = False,
        overlap: float = 0.5,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.validation_cases = list(validation_cases)
        self.labels = labels
        self.n_classes = labels.out_channels
        self.overlap = overlap
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.loader: EpochLoader | None = None
        # nnU-Net's losses, 1:1 and smooth 1e-5: soft Dice without background + cross-entropy
        # over softmax classes; for regions soft Dice per region + binary cross-entropy on
        # sigmoid outputs (MONAI's DiceCELoss switches to BCE-with-logits with sigmoid)
        if labels.regions:
            self.loss_function = DiceCELoss(sigmoid=True, batch=batch_dice, smooth_nr=1e-5,
                                            smooth_dr=1e-5)
        else:
            self.loss_function = DiceCELoss(
                include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                smooth_nr=1e-5, smooth_dr=1e-5,
            )
        self.deep_loss: DeepSupervisionLoss | None = None
        self.example: dict[str, Any] | None = None  # last validation example, for figures

    def batches(self, epoch: int, processes: Processes = ONE_PROCESS) -> DataLoader:
        """The run's one loader (workers kept between epochs), set to EPOCH."""
        key = (processes.rank, processes.world_size)
        if self.loader is None or self.loader.key != key:
            self.loader = EpochLoader(self.dataset, *key, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory)
        return self.loader.epoch(epoch)

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """What the loss compares with: the label map, or (B, R, ...) region masks."""
        if not self.labels.regions:
            return label
        masks = [torch.isin(label[:, 0], torch.tensor(values, device=label.device))
                 for values in self.labels.values]
        return torch.stack(masks, dim=1).float()

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        augment = getattr(self.dataset, "augment", None)
        if isinstance(augment, DeviceAugmenter):  # the batch at once, here
            image, label = augment(image, label, batch["parameters"])
        label = self.targets(label)
        output = model(image)
        if isinstance(output, list | tuple):
            # nnU-Net's deep supervision: one output per decoder level, full size first, each
            # scored against the labels resized to it (MONAI's DeepSupervisionLoss,
            # nearest-exact, as nnU-Net's DownsampleSegForDSTransform; torch resizes float
            # tensors only)
            return self._deep_supervision(len(output))(list(output), label.float()), len(image)
        return self.loss_function(output, label), len(image)

    def _deep_supervision(self, heads: int) -> DeepSupervisionLoss:
        """nnU-Net's weights: 1/2^level, normalised to sum to 1."""
        if self.deep_loss is None:
            weights = [0.5**level for level in range(heads)]
            weights = [w / sum(weights) for w in weights]
            self.deep_loss = DeepSupervisionLoss(self.loss_function, weights=weights)
        return self.deep_loss

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Sliding-window prediction of each validation case (preprocessed grid); mean Dice
        per class over cases, and their mean as the score that selects `best`."""
        per_case = []
        for index, case in enumerate(self.validation_cases):
            probabilities = predict_probabilities(
                model, case.data, self.dataset.patch_size, device, overlap=self.overlap,
                batch_size=self.dataset.batch_size, sigmoid=self.labels.regions,
            )
            if self.labels.regions:
                regions = probabilities > REGION_THRESHOLD
                prediction = torch.from_numpy(self.labels.labels_from_regions(regions.numpy()))
                per_case.append(dice_per_region(
                    regions, torch.from_numpy(self.labels.region_masks(case.seg))))
            else:
                prediction = probabilities.argmax(0)
                per_case.append(dice_per_class(prediction, torch.from_numpy(case.seg),
                                               self.n_classes))
            if index == 0:
                self.example = {
                    "case_id": case.case_id, "image": case.data[0], "reference": case.seg,
                    "prediction": prediction.numpy().astype(np.uint8),
                }
        dice = torch.nanmean(torch.stack(per_case), dim=0).tolist()
        metrics = {f"dice_{c}": d for c, d in enumerate(dice, start=1)}
        metrics["score"] = float(np.nanmean(dice)) if not all(map(math.isnan, dice)) else math.nan
        return metrics


    def write_figures(self, folder: Path) -> list[Path]:
        """The last validation's first case: image, reference and prediction."""
        if self.example is None:
            return []
        example = self.example
        n_colours = max(self.labels.regions_class_order or (self.n_classes - 1,)) + 1
        values = self.labels.regions_class_order or range(1, len(self.labels.names) + 1)
        return [plot_segmentation_overlay(
            example["image"], example["reference"], example["prediction"], n_colours,
            folder / "validation_overlay.png", title=example["case_id"],
            legend=dict(zip(values, self.labels.names, strict=True)),
        )]


# --------------------------------------------------------------------------- the entry point


def describe_run(config: PipelineConfig, plans: Plans, model: str, fold: int,
                 training: TrainingConfig) -> SegmentationRunSpec:
    """Everything that defines the run; its hash guards resume against a changed config."""
    plan = plans.configuration(config.configuration)
    architecture = plan.architecture.arch_kwargs
    shape = NetworkShape(plans.in_channels, plans.out_channels, architecture)
    patch = fit_patch_size(model, training.patch_size or plan.patch_size, shape,
                           config.model_options(model))
    training = training.within_budget(training.batch_size or plan.batch_size)
    return SegmentationRunSpec(
        **common_fields(config, plans, model, fold, training),
        out_channels=plans.out_channels,
        architecture=architecture,
        patch_size=patch,
        batch_size=training.batch_size or plan.batch_size,
        batch_dice=plan.batch_dice,
    )


def augmenter(spec: SegmentationRunSpec,
              training: TrainingConfig) -> Augmenter | DeviceAugmenter | None:
    """nnU-Net's augmentation where the config puts it (`training.augment_on`)."""
    if not training.augment:
        return None
    if training.augment_on == "loader":
        return Augmenter(spec.patch_size)
    if not supports_on_device(spec.patch_size):
        raise MedpipeError(
            f"training.augment_on=device: the patch {tuple(spec.patch_size)} is augmented "
            "in-plane (nnU-Net's dummy 2D for anisotropic patches), which only the loader "
            "does; use training.augment_on=loader")
    return DeviceAugmenter(spec.patch_size,
                           (0, *(v for values in spec.label_scheme.values for v in values)))


def train_segmentation(
    config: PipelineConfig,
    model: str,
    fold: int,
    run_dir: Path | None = None,
    restart: bool = False,
    progress: bool = True,
    restart_if_changed: bool = False,
    processes: Processes = ONE_PROCESS,
) -> Path:
    """Train MODEL on FOLD (as one of PROCESSES: `training.distributed`); resumes an
    interrupted run in the same folder. Returns the folder."""
    return fit_run(config, segmentation_setup(config, model, fold, run_dir, restart,
                                           restart_if_changed, processes), progress)


def segmentation_setup(config: PipelineConfig, model: str, fold: int,
                       run_dir: Path | None = None, restart: bool = False,
                       restart_if_changed: bool = False,
                       processes: Processes = ONE_PROCESS) -> RunSetup:
    """The described run folder (resume guard checked), the network with its seeded initial
    weights, the task with its patch sampler, and the device: what `train_segmentation`
    fits, and what benchmarks time."""
    model_spec(model, task="segmentation")
    training = config.training_for(model)
    plans = model_plans(config, model)
    spec = describe_run(config, plans, model, fold, training)
    training = spec.training  # with the budget's iterations per epoch
    folder = RunFolder(run_dir) if run_dir else config.run_folder(model, fold)
    device = start(processes, pick_device(training.device))
    # before the folder is touched: the batch, its one-hot labels and the first layer's
    # activations in float32 (a lower bound): a batch that cannot fit is refused, not killed
    voxels = spec.batch_size * float(np.prod(spec.patch_size))
    require_memory(voxels * (spec.in_channels + len(spec.labels) + 32) * 4, device,
                   f"a training batch of {spec.batch_size} x {tuple(spec.patch_size)}")
    if processes.is_main:
        prepare_run_folder(config, plans, folder, spec, restart, restart_if_changed)
    wait_for_main(processes)
    torch.manual_seed(training.seed)  # the initial weights
    network = build_model(model, spec.network_shape, spec.model_options)
    dataset = PatchDataset(
        load_labelled_cases(config.preprocessed_dir, spec.train_cases),
        spec.patch_size, spec.batch_size, training.iterations_per_epoch,
        seed=training.seed, oversample_foreground=training.oversample_foreground,
        augment=augmenter(spec, training),
    )
    task = SegmentationTask(
        dataset, load_labelled_cases(config.preprocessed_dir, spec.val_cases),
        labels=spec.label_scheme, batch_dice=spec.batch_dice,
        overlap=training.val_overlap, num_workers=loader_workers(training.num_workers, device),
        pin_memory=device.type == "cuda",
    )
    return RunSetup(folder, spec, plans, network, task, device, processes)
