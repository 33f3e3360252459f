"""Typed configuration, validated once at the edge.

One YAML file (e.g. `configs/demo.yaml`) serves Snakemake and the `medpipe` commands. Its
top level names the data (`dataset`, `results`, ...); `training` holds the settings shared by
every model; `models.<name>` holds a model's options and its own training overrides;
`tracking` says where MLflow writes. Layering, lowest first: built-in defaults, the model's
literature optimiser, `training`, with `recipe: native` the model's own recipe (its authors'
optimiser, schedule, augmentation, patch; `medpipe.models`), `models.<name>.training`,
`--set key=value` overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import Field, PositiveFloat, ValidationError

from medpipe.errors import MedpipeError
from medpipe.runs.folder import RunFolder
from medpipe.training_settings import StrictModel, TrainingConfig

if TYPE_CHECKING:
    from medpipe.models import ModelOptions

DEFAULT_STORE = "mlflow.db"  # the default tracking store's file, in the results folder
DEFAULT_ARTIFACTS = "mlruns"  # where the default store keeps its experiments' artifacts


PlannerName = Literal["default", "ResEncM", "ResEncL", "ResEncXL"]  # planning.PLANNERS
RecipeName = Literal["shared", "native"]


class ModelEntry(StrictModel):
    options: dict[str, Any] = Field(
        {}, description="the network's settings (the model's options type)")
    training: TrainingConfig = Field(TrainingConfig(),
                                     description="this model's training overrides")
    seeds: list[int] | None = Field(None, min_length=1, description="this model's training "
                                    "seeds; null: the shared `seeds`")
    planner: PlannerName | None = Field(
        None, description="the plans this model trains with; null: the workflow's `planner`, "
        "or ResEnc M for a model that needs residual-encoder plans (nnunet_resenc) when that "
        "is `default` (planned beside plans.json over the same preprocessed cases, as nnU-Net "
        "keeps nnUNetResEncUNetMPlans.json beside nnUNetPlans.json)")


class ClassicalSettings(StrictModel):
    """The classical baseline (`registration.classical`): SimpleITK affine + a deformable
    stage, and the affine pre-alignment of the networks' pairs (`deformable: none`)."""

    deformable: Literal["demons", "bspline", "none"] = Field(
        "demons", description="the stage after the affine: diffeomorphic demons, a Mattes-MI "
        "B-spline, or none")
    histogram_bins: int = Field(32, ge=2, description="Mattes mutual information bins")
    # 1.0: every fixed voxel, deterministic. Below 1, random sampling, which SimpleITK does
    # not reproduce from its seed (the demo's pre-alignment moved by up to 10 mm between
    # two identical runs), so it is only for the slower B-spline stage when speed matters
    sampling_fraction: float = Field(1.0, gt=0, le=1, description="share of fixed voxels "
                                     "the metric samples (1: all, deterministic)")
    affine_iterations: int = Field(200, ge=1, description="affine iterations per level")
    bspline_iterations: int = Field(100, ge=1, description="B-spline iterations per level")
    demons_iterations: int = Field(50, ge=1, description="demons iterations")
    demons_sigma: float = Field(1.5, gt=0, description="Gaussian smoothing of the demons "
                                "field after each update, voxels")
    bspline_mesh_mm: float = Field(40.0, gt=0, description="B-spline control point spacing")
    shrink_factors: tuple[int, ...] = Field((4, 2, 1), description="pyramid shrink factors")
    smoothing_sigmas: tuple[float, ...] = Field((2.0, 1.0, 0.0), description="pyramid "
                                                "smoothing per level, voxels")
    seed: int = Field(0, description="seed of the metric's random sampling")


ANTS_STANDARD = "antsRegistrationSyN[s]"


class AntsSettings(StrictModel):
    """The ANTs baselines (`registration.ants`): ANTsPy's `ants.registration`. Baseline
    `ants` runs TRANSFORM (by default ANTsPy's quick `SyN`); baseline `ants_standard` runs
    ANTs' standard preset `antsRegistrationSyN[s]` with the same threads and seed."""

    transform: str = Field("SyN", description="ANTsPy's type_of_transform for the `ants` "
                           "baseline: SyN (ANTsPy's quick default: affine, then SyN with "
                           "Mattes MI at 40x20x0 iterations), SyNCC, antsRegistrationSyN[s], "
                           "antsRegistrationSyNQuick[s], ...")
    # with 2 threads a pair's Dice varied by up to 0.009 over 3 identical runs; single-
    # threaded runs were identical (measured on the demo, antspyx 0.6.3; a test checks that
    # two deterministic runs give the same field)
    deterministic: bool = Field(True, description="one thread and a fixed seed, so a "
                                "result is reproduced exactly (ANTs with several threads is "
                                "not); false: all threads, faster")
    seed: int = Field(0, description="ANTs' random seed (its metric sampling)")


class InstanceOptimisationSettings(StrictModel):
    """Instance optimisation (`registration.instance_optimisation`): a network's field
    refined per pair at inference by a few Adam steps on the training loss's image terms
    (similarity + diffusion; no labels), as the top Learn2Reg entries and uniGradICON's IO
    do. Scored as its own method, NETWORK_io, with its own time."""

    steps: int = Field(25, ge=0, description="Adam steps per pair; 0: no instance-optimised "
                       "rows (the workflow scores NETWORK_io beside each network when > 0)")
    lr: float = Field(0.2, gt=0, description="Adam's step size, voxels of the grid it runs on")
    regularisation: float | None = Field(None, ge=0, description="diffusion weight; null: "
                                         "the network's training weight")
    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = Field(
        None, description="the grid (mm) the refinement runs on; null: the network's own "
        "(a finer grid resolves finer detail than the network's, at more time per step)")


class NetworkRegistrationSettings(StrictModel):
    """What a registration network learns from: part of its run's description, so changing
    any of these makes a different run."""

    atlas: str | None = Field(None, description="a case id: register every case to it; "
                              "null: subject to subject")
    # moments by default: a pair is then registered by forward passes only. On the demo a
    # per-pair affine took most of a network's time (about 1.15 s of its 1.3 s a pair, 3 mm)
    prealign: Literal["moments", "affine", "none"] = Field(
        "moments", description="global alignment before the network: moments (the centres "
        "of mass matched, milliseconds), affine (an iterative SimpleITK affine registration "
        "per pair, as VoxelMorph's data), none")
    # Deformations are smooth, so a coarser grid costs little accuracy and makes CPU training
    # ~8x cheaper per halving
    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = Field(
        None, description="the networks' grid in mm; null: the plans' spacing")
    similarity: Literal["lncc", "mse"] = Field("lncc", description="image similarity loss")
    lncc_window: int = Field(9, ge=3, description="LNCC window, voxels (VoxelMorph's)")
    regularisation: float = Field(1.0, ge=0, description="weight of the field's diffusion "
                                  "(gradient L2) penalty")
    # semi-supervised by default (a dataset in the nnU-Net layout has training labels):
    # VoxelMorph's semi-supervised variant; on the demo (3 mm, 200 pairs) mean Dice 0.577
    # with it, 0.561 without
    dice_weight: float = Field(1.0, ge=0, description="> 0: semi-supervised, weight of the "
                               "Dice of warped training labels; 0: unsupervised")
    val_pairs: int = Field(6, ge=1, description="validation pairs during training")
    unlabelled: bool = Field(True, description="train the networks on the dataset's "
                             "unlabelled training scans (imagesTrUnlabelled) too, beside the "
                             "fold's training cases (their pairs have no Dice term)")


class RegistrationConfig(NetworkRegistrationSettings):
    """What the registration networks learn from and how the methods are compared."""

    models: list[str] = Field(["voxelmorph", "voxelmorph_diff"],
                              description="the registration networks the workflow trains")
    baselines: list[Literal["identity", "classical", "ants", "ants_standard"]] = Field(
        ["identity", "classical"], description="the baselines the workflow scores (ants: "
        "ANTsPy's quick SyN; ants_standard: ANTs' standard preset antsRegistrationSyN[s], "
        "about 20x slower; both need ANTsPy, see `make ants-env`)")
    eval_pairs: int = Field(20, ge=1, description="held-out pairs scored by evaluate-reg")
    eval_cases: Literal["validation", "test"] = Field(
        "validation", description="the cases evaluate-reg pairs: the fold's validation cases, "
        "or the labelled test cases (imagesTs with labelsTs), the same pairs for every fold")
    classical: ClassicalSettings = Field(
        ClassicalSettings(), description="the SimpleITK baseline and the pre-alignment")
    ants: AntsSettings = Field(AntsSettings(), description="the ANTs baseline")
    instance_optimisation: InstanceOptimisationSettings = Field(
        InstanceOptimisationSettings(), description="per-pair refinement of each network's "
        "field, scored as NETWORK_io")

    def network_settings(self) -> NetworkRegistrationSettings:
        return NetworkRegistrationSettings(
            **self.model_dump(include=set(NetworkRegistrationSettings.model_fields)))


@dataclass(frozen=True)
class TrackingStore:
    """Where a workflow's runs are logged. The default store belongs to the results it
    describes (RESULTS/mlflow.db, artifacts in RESULTS/mlruns), so every command finds it
    from the config alone, whatever folder it runs in; MLflow's own default artifact folder
    (./mlruns) would follow the working directory instead."""

    uri: str
    artifact_root: Path | None  # None: the store's own (a server's, a URI's choice)
    experiment: str | None  # None: the dataset's name

    def experiment_for(self, dataset: str) -> str:
        return self.experiment or dataset


class TrackingConfig(StrictModel):
    enabled: bool = Field(True, description="log runs, metrics, figures and models to MLflow")
    uri: str | None = Field(None, description="tracking store; null: $MLFLOW_TRACKING_URI, "
                            "else sqlite RESULTS/mlflow.db (artifacts in RESULTS/mlruns)")
    experiment: str | None = Field(None, description="MLflow experiment; null: the "
                                   "dataset's name")

    def store(self, results: Path) -> TrackingStore | None:
        """The store runs of RESULTS log to; None when tracking is off."""
        if not self.enabled:
            return None
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return TrackingStore(uri, None, self.experiment)
        results = results.absolute()
        return TrackingStore(f"sqlite:///{results / DEFAULT_STORE}",
                             results / DEFAULT_ARTIFACTS, self.experiment)


class PipelineConfig(StrictModel):
    dataset: Path = Field(description="dataset folder in the nnU-Net v2 raw layout")
    results: Path = Field(description="folder for every output of the workflow")
    configuration: Literal["3d_fullres", "3d_lowres"] = Field(
        "3d_fullres", description="the plans configuration to preprocess and train with")
    folds: int = Field(5, ge=2, description="cross-validation folds of the split")
    planner: PlannerName = Field(
        "default", description="nnU-Net v2's planner the plans follow: default "
        "(ExperimentPlanner, a plain U-Net) or a Residual Encoder preset (nnUNetPlannerResEncM "
        "/ L / XL: 8 / 24 / 40 GB, for `nnunet_resenc`)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="GPU memory the plans' patch "
                                        "and batch size are sized for; null: the planner's "
                                        "own target (8 GB; ResEnc M / L / XL 8 / 24 / 40)")
    segmentation_models: list[str] = Field(
        ["nnunet", "unet", "swin_unetr"],
        description="the segmentation models the workflow trains and evaluates")
    train_folds: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 1, 2, 3, 4],
        description="the cross-validation folds the workflow trains")
    seeds: list[int] = Field(
        [0], min_length=1, description="training seeds: the workflow trains each model once "
        "per seed on each fold in train_folds (repeated runs, so that the report can measure "
        "run-to-run variance); the first seed's runs are RESULTS/runs/MODEL/fold_K (the fold "
        "ensemble that predicts the test set), the others RESULTS/runs/MODEL/seed_S/fold_K; "
        "with several runs per model each run is also scored on the labelled test cases, so "
        "that runs pair on the same cases")
    recipe: RecipeName = Field(
        "shared", description="shared: every model trains with the settings in `training` "
        "(one optimiser and schedule for all); native: each model with its authors' recipe "
        "(nnunet, nnunet_resenc: nnU-Net's SGD + poly, deep supervision, augmentation, planned "
        "patch and batch; unet, swin_unetr: MONAI's tutorials'; see the README), over "
        "`training` and under `models.<name>.training`")
    training: TrainingConfig = Field(TrainingConfig(),
                                     description="training settings shared by every model")
    models: dict[str, ModelEntry] = Field(
        {}, description="per model name, `options` (the net's settings) and `training` "
        "overrides")
    registration: RegistrationConfig = Field(
        RegistrationConfig(), description="registration networks, baselines and their pairs")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow tracking")
    container: str | None = Field(
        None, description="an Apptainer image (medpipe.sif, or docker://...) the rules run "
        "in when Snakemake is called with --software-deployment-method apptainer")

    @property
    def tracking_store(self) -> TrackingStore | None:
        """Where this workflow's runs are logged (None: tracking off)."""
        return self.tracking.store(self.results)

    @property
    def plans_file(self) -> Path:
        return self.results / "plans.json"

    def planner_for(self, model: str) -> PlannerName:
        """The planner whose plans MODEL trains with: its own setting, else the workflow's,
        unless the model needs residual-encoder plans and the workflow's are plain."""
        from medpipe.models import model_spec

        chosen = self.model_entry(model).planner
        if chosen is not None:
            return chosen
        if model_spec(model).needs_residual_plans and self.planner == "default":
            return "ResEncM"
        return self.planner

    def plans_file_for(self, model: str) -> Path:
        """MODEL's plans: plans.json, or RESULTS/plans_PLANNER.json beside it when the model
        trains with another planner's (sharing plans.json's preprocessed cases)."""
        planner = self.planner_for(model)
        return self.plans_file if planner == self.planner else \
            self.results / f"plans_{planner}.json"

    def seeds_for(self, model: str) -> list[int]:
        """MODEL's training seeds: its own `seeds`, else the shared ones."""
        return self.model_entry(model).seeds or self.seeds

    @property
    def splits_file(self) -> Path:
        return self.results / "splits.json"

    @property
    def preprocessed_dir(self) -> Path:
        return self.results / "preprocessed" / self.configuration

    def run_folder(self, model: str, fold: int) -> RunFolder:
        """Where MODEL's FOLD lives: `RESULTS/runs/MODEL/fold_K` for the first of its seeds,
        `RESULTS/runs/MODEL/seed_S/fold_K` for another (the seed its training settings
        resolve to)."""
        from medpipe.models import MODELS

        runs = self.results / "runs" / model
        if model in MODELS and (seed := self.training_for(model).seed) != \
                self.seeds_for(model)[0]:  # a baseline or NETWORK_io has no seeds
            runs = runs / f"seed_{seed}"
        return RunFolder(runs / f"fold_{fold}")

    def model_entry(self, model: str) -> ModelEntry:
        return self.models.get(model, ModelEntry())

    def model_options(self, model: str) -> ModelOptions:
        """MODEL's options, validated by the model's own options type."""
        from medpipe.models import parse_options

        return parse_options(model, self.model_entry(model).options)

    def training_for(self, model: str) -> TrainingConfig:
        """The training settings of MODEL: its optimiser defaults, the shared settings,
        its own recipe (with `recipe: native`), then the model's overrides."""
        from medpipe.models import model_spec

        spec = model_spec(model)
        recipe = spec.native_recipe if self.recipe == "native" else None
        try:
            return self.training.overridden_by(self.model_entry(model).training,
                                               spec.optimizer_defaults, recipe)
        except ValidationError as error:
            raise MedpipeError(
                f"invalid training settings for {model!r}: {_explain(error)}"
            ) from None

    def check_models(self) -> None:
        """Every model named in `models` exists and its options and training settings are
        valid: errors surface when the config is read, not hours into a workflow."""
        for model in self.models:
            self.model_options(model)
            self.training_for(model)


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
        config = PipelineConfig(**data)
    except ValidationError as error:
        raise MedpipeError(f"invalid config: {_explain(error)}", path) from None
    try:
        config.check_models()
    except MedpipeError as error:
        raise MedpipeError(f"invalid config: {error.reason}", path) from None
    return config


def _explain(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
    )


SCHEMA_HEADER = (
    "# Generated from medpipe.config.PipelineConfig by `medpipe config-schema`: do not edit.\n"
    "# The Snakefile validates every config against it; medpipe validates the same types.\n"
)


def config_schema() -> dict[str, Any]:
    """The JSON schema of a pipeline config, from the types medpipe validates with."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "medpipe workflow configuration",
            **PipelineConfig.model_json_schema()}


def write_schema(path: str | Path) -> Path:
    from medpipe.io import atomic_output

    path = Path(path)
    with atomic_output(path) as staging:
        schema = yaml.safe_dump(config_schema(), sort_keys=False, width=100)
        staging.write_text(SCHEMA_HEADER + schema, encoding="utf-8")
    return path
