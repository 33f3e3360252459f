"""Typed configuration, validated once at the edge.

One YAML file (e.g. `configs/demo.yaml`) serves Snakemake and the `medpipe` commands. Its
top level names the data (`dataset`, `results`, ...); `training` holds the settings shared by
every model; `models.<name>` holds a model's options and its own training overrides;
`tracking` says where MLflow writes. Layering, lowest first: built-in defaults, the model's
literature optimiser, `training`, `models.<name>.training`, `--set key=value` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medpipe.errors import MedpipeError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # SGD only
    nesterov: bool = True  # SGD only
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_exponent: float = Field(0.9, gt=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)  # of all iterations, cosine only


class TrainingConfig(StrictModel):
    """How long and how to train; None means 'take it from the plans'."""

    epochs: int = Field(1000, ge=1)  # nnU-Net's default 1000 x 250
    iterations_per_epoch: int = Field(250, ge=1)
    batch_size: int | None = Field(None, ge=1)
    patch_size: tuple[int, int, int] | None = None
    oversample_foreground: float = Field(0.33, ge=0, le=1)
    augment: bool = True
    val_every: int = Field(50, ge=1)  # epochs between validations (the last always validates)
    val_overlap: float = Field(0.5, ge=0, lt=1)  # sliding-window overlap
    amp: bool = True  # bf16 (or fp16 + scaler) autocast on CUDA; ignored on CPU
    grad_clip: float | None = Field(12.0, gt=0)
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    optimizer: dict[str, Any] = Field(default_factory=dict)  # overrides of the model's defaults


class ModelEntry(StrictModel):
    options: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)


class RegistrationConfig(StrictModel):
    """What the registration networks learn from and how the methods are compared."""

    models: list[str] = Field(default_factory=lambda: ["voxelmorph", "voxelmorph_diff"])
    baselines: list[Literal["identity", "classical"]] = Field(
        default_factory=lambda: ["identity", "classical"])
    atlas: str | None = None  # a case id: every case to it; None: subject to subject
    prealign: Literal["affine", "none"] = "affine"  # SimpleITK affine, as VoxelMorph's data
    # the networks' grid in mm; None: the plans' spacing. Deformations are smooth, so a
    # coarser grid costs little accuracy and makes CPU training ~8x cheaper per halving
    spacing: tuple[float, float, float] | None = None
    similarity: Literal["lncc", "mse"] = "lncc"
    lncc_window: int = Field(9, ge=3)  # voxels, VoxelMorph's
    regularisation: float = Field(1.0, ge=0)  # lambda x diffusion (gradient L2) of the field
    dice_weight: float = Field(0.0, ge=0)  # > 0: semi-supervised, Dice of warped labels
    val_pairs: int = Field(6, ge=1)  # validation pairs during training
    eval_pairs: int = Field(20, ge=1)  # held-out pairs scored by evaluate-reg
    classical: dict[str, Any] = Field(default_factory=dict)  # ClassicalSettings overrides


class TrackingConfig(StrictModel):
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # None: the dataset's name

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class PipelineConfig(StrictModel):
    dataset: Path
    results: Path
    file_ending: str = ".nii.gz"
    configuration: Literal["3d_fullres", "3d_lowres"] = "3d_fullres"
    folds: int = Field(5, ge=2)
    gpu_memory_gb: float = Field(8, gt=0)
    segmentation_models: list[str] = Field(default_factory=lambda: ["nnunet", "unet",
                                                                     "swin_unetr"])
    train_folds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    training: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    registration: RegistrationConfig = RegistrationConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def plans_file(self) -> Path:
        return self.results / "plans.json"

    @property
    def splits_file(self) -> Path:
        return self.results / "splits.json"

    @property
    def preprocessed_dir(self) -> Path:
        return self.results / "preprocessed" / self.configuration

    def run_dir(self, model: str, fold: int) -> Path:
        return self.results / "runs" / model / f"fold_{fold}"

    def model_entry(self, model: str) -> ModelEntry:
        return self.models.get(model, ModelEntry())

    def training_for(self, model: str, optimizer_defaults: dict[str, Any]) -> TrainingConfig:
        """The training settings of MODEL: shared settings, then the model's overrides."""
        merged = merge(self.training, self.model_entry(model).training)
        merged["optimizer"] = merge(optimizer_defaults, merged.get("optimizer", {}))
        try:
            training = TrainingConfig(**merged)
            OptimizerConfig(**training.optimizer)
        except ValidationError as error:
            raise MedpipeError(
                f"invalid training settings for {model!r}: {_explain(error)}"
            ) from None
        return training


def optimizer_config(training: TrainingConfig) -> OptimizerConfig:
    return OptimizerConfig(**training.optimizer)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: OVERRIDE wins, nested dicts are merged, not replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings; values are parsed as YAML (`2`, `[8, 16]`, `true`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MedpipeError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MedpipeError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline config; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise MedpipeError(f"cannot read config: {error}", path) from None
    if not isinstance(data, dict):
        raise MedpipeError("config must be a mapping of settings", path)
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig(**data)
    except ValidationError as error:
        raise MedpipeError(f"invalid config: {_explain(error)}", path) from None


def _explain(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
    )
