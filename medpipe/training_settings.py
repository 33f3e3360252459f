"""How a network trains: the optimiser, its schedule, and the training settings.

They sit below both the pipeline config (`medpipe.config`, which layers them) and the models
(`medpipe.models`, whose literature defaults and native recipes are written in them), so the
models never import the config; only the config reaches up to the models, lazily, to check
each model's options.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(StrictModel):
    """An optimiser and its schedule. In a config every field is an override: the fields
    left out take the model's literature defaults (`medpipe.models`), not the ones here."""

    name: Literal["sgd", "adamw"] = Field("sgd", description="the optimiser")
    lr: float = Field(0.01, gt=0, description="initial learning rate")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (SGD only)")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD only)")
    schedule: Literal["poly", "cosine", "constant"] = Field(
        "poly", description="poly: nnU-Net's lr x (1 - t/T)^0.9; cosine: linear warm-up then "
        "cosine decay; constant")
    poly_exponent: float = Field(0.9, gt=0, description="exponent of the poly schedule")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="warm-up share of all "
                                   "iterations (cosine only)")

    def overridden_by(self, *overrides: OptimizerConfig) -> OptimizerConfig:
        """These settings with the fields each of OVERRIDES sets replacing them, in turn."""
        merged = self.model_dump(exclude_unset=True)
        for override in overrides:
            merged |= override.model_dump(exclude_unset=True)
        return OptimizerConfig(**merged)


class TrainingConfig(StrictModel):
    """How long and how to train; None means 'take it from the plans'. In a config the
    fields set in `models.<name>.training` replace those of the shared `training`."""

    epochs: int = Field(1000, ge=1, description="epochs (nnU-Net: 1000 x 250 iterations)")
    iterations_per_epoch: int = Field(250, ge=1, description="optimiser steps per epoch "
                                      "(derived from `budget_samples` when that is set)")
    budget_samples: int | None = Field(
        None, ge=1, description="the training budget in samples seen (patches or pairs) over "
        "the whole run: iterations_per_epoch becomes ceil(budget / (epochs x batch_size)), so "
        "every model given one budget sees as many samples (within a batch per epoch) and "
        "validates as often; null: epochs x iterations_per_epoch x batch_size")
    batch_size: int | None = Field(None, ge=1, description="samples per step; null: the "
                                   "plans' (segmentation), 1 (registration)")
    patch_size: tuple[int, int, int] | None = Field(
        None, description="training patch in voxels (i, j, k); null: the plans', rounded to "
        "what the net accepts")
    oversample_foreground: float = Field(0.33, ge=0, le=1, description="share of each batch "
                                         "centred on a foreground class (nnU-Net's 1/3)")
    augment: bool = Field(True, description="spatial and intensity augmentation")
    augment_on: Literal["loader", "device"] = Field(
        "loader", description="where augmentation runs: loader (each patch in the loader "
        "workers, as nnU-Net) or device (the batch at once on the training device, the same "
        "distributions; for a GPU the workers cannot keep fed; not for in-plane patches)")
    val_every: int = Field(50, ge=1, description="epochs between validations (the last "
                           "always validates)")
    val_overlap: float = Field(0.5, ge=0, lt=1, description="sliding-window overlap in "
                               "validation")
    amp: bool = Field(True, description="mixed precision: bf16 (or fp16 + loss scaling) "
                      "autocast on CUDA, bf16 on a CPU with native bf16 (AVX-512 BF16/AMX)")
    amp_dtype: Literal["auto", "bf16", "fp16"] = Field(
        "auto", description="with amp: auto takes bf16 where the device computes it natively "
        "(a GPU of compute capability 8.0+, a CPU with AVX-512 BF16/AMX), fp16 with loss "
        "scaling on an older GPU, fp32 on another CPU; bf16 or fp16 force one (fp16 on a "
        "CPU runs the GPU's loss-scaling path there)")
    grad_clip: float | None = Field(12.0, gt=0, description="gradient norm clip; null: none")
    seed: int = Field(0, description="seeds the initial weights and every sample")
    num_workers: int | None = Field(None, ge=0, description="patch loader processes; null: "
                                    "from the CPU count (on a GPU the cores less two, at most "
                                    "12, nnU-Net's default; on a CPU one, the cores being the "
                                    "network's)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when "
                                                   "there is a GPU")
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(),
        description="overrides of the model's optimiser defaults (only the fields given)")

    def within_budget(self, batch_size: int) -> TrainingConfig:
        """These settings with `iterations_per_epoch` derived from `budget_samples` for
        BATCH_SIZE samples per step (unchanged when no budget is set)."""
        if self.budget_samples is None:
            return self
        steps = math.ceil(self.budget_samples / (self.epochs * batch_size))
        return self.model_copy(update={"iterations_per_epoch": steps})

    def overridden_by(self, override: TrainingConfig, optimizer_defaults: OptimizerConfig,
                      recipe: TrainingConfig | None = None) -> TrainingConfig:
        """These shared settings with the fields OVERRIDE sets replacing them, and the
        optimiser layered on OPTIMIZER_DEFAULTS: defaults, shared, then OVERRIDE's. A model's
        own RECIPE (`recipe: native`) goes between the shared settings and OVERRIDE, and its
        optimiser replaces the shared one whole (an SGD recipe keeps no AdamW field)."""
        merged = self.model_dump(exclude_unset=True)
        optimizer = optimizer_defaults.overridden_by(self.optimizer)
        if recipe is not None:
            merged |= recipe.model_dump(exclude_unset=True)
            optimizer = optimizer_defaults.overridden_by(recipe.optimizer)
        merged |= override.model_dump(exclude_unset=True)
        merged["optimizer"] = optimizer.overridden_by(override.optimizer)
        return TrainingConfig(**merged)
