"""`plans.json` as typed objects: parsed once where it is read, written only at the file.

nnU-Net wraps its plans dict in a `PlansManager` whose accessors read string keys on every
call; here the file is validated once into frozen models (unknown or missing keys are an
error naming the file), and every stage after planning reads attributes. Field names and
their order are nnU-Net's plans.json names (per-axis values in medpipe's (i, j, k) order);
`Plans.model_dump(mode="json")` writes the same file the planner wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from medpipe.data.labels import HasLabels
from medpipe.errors import MedpipeError
from medpipe.io import write_json

# a model's own files are input too: a zero patch edge or spacing is refused when read
Triplet = tuple[PositiveInt, PositiveInt, PositiveInt]
Millimetres = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Spacing = tuple[Millimetres, Millimetres, Millimetres]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureKwargs(_Frozen):
    """The U-Net topology the planner chose (nnU-Net's `arch_kwargs`): convs per encoder
    stage for a plain U-Net, residual blocks per stage for a residual encoder (ResEnc)."""

    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[Triplet, ...]
    strides: tuple[Triplet, ...]
    n_conv_per_stage: tuple[int, ...] | None = None
    n_blocks_per_stage: tuple[int, ...] | None = None
    n_conv_per_stage_decoder: tuple[int, ...]

    @model_validator(mode="after")
    def _one_encoder_kind(self) -> ArchitectureKwargs:
        if (self.n_conv_per_stage is None) == (self.n_blocks_per_stage is None):
            raise ValueError("needs exactly one of n_conv_per_stage (a plain U-Net) and "
                             "n_blocks_per_stage (a residual encoder)")
        return self

    @property
    def residual(self) -> bool:
        return self.n_blocks_per_stage is not None


class Architecture(_Frozen):
    network_class_name: str
    arch_kwargs: ArchitectureKwargs


class PlanConfiguration(_Frozen):
    """One configuration (`3d_fullres`, `3d_lowres`): grid, patch, batch, net, normalisation;
    `reasons` says in words why each value was chosen."""

    batch_size: PositiveInt
    patch_size: Triplet
    median_image_size_in_voxels: tuple[float, float, float]
    spacing: Spacing
    architecture: Architecture
    estimated_activations: int
    reasons: dict[str, str]
    data_identifier: str
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    batch_dice: bool


class IntensityProperties(_Frozen):
    """Foreground intensity statistics of one channel (CT normalisation uses them)."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_99_5: float
    percentile_00_5: float
    name: str | None = None


class Plans(_Frozen, HasLabels):
    dataset_name: str
    plans_name: str
    axes: str
    original_median_spacing: Spacing
    original_median_shape: Triplet
    configurations: dict[str, PlanConfiguration]
    foreground_intensity_properties_per_channel: dict[str, IntensityProperties]
    labels: dict[str, int | tuple[int, ...]]
    regions_class_order: tuple[int, ...] | None = None  # set: region-based labels
    channel_names: dict[str, str]
    gpu_memory_target_gb: float
    data_hash: str | None
    experiment_planner_used: str

    @property
    def out_channels(self) -> int:
        return self.label_scheme.out_channels

    def configuration(self, name: str) -> PlanConfiguration:
        """The configuration NAME, or an error listing the ones these plans have."""
        try:
            return self.configurations[name]
        except KeyError:
            known = ", ".join(self.configurations)
            raise MedpipeError(
                f"plans have no configuration {name!r} (have: {known})") from None

    def with_features(self, name: str, features: tuple[int, ...]) -> Plans:
        """These plans with configuration NAME's features per stage replaced, as nnU-Net
        users edit plans.json for a smaller or larger net."""
        configuration = self.configurations[name]
        architecture = configuration.architecture
        kwargs = architecture.arch_kwargs.model_copy(update={"features_per_stage": features})
        changed = configuration.model_copy(update={
            "architecture": architecture.model_copy(update={"arch_kwargs": kwargs})})
        return self.model_copy(
            update={"configurations": {**self.configurations, name: changed}})


def parse_plans(data: object, path: Path | None = None) -> Plans:
    """Plans from their JSON content; an error names the file and the bad field."""
    try:
        return Plans.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'plans'}: {e['msg']}"
            for e in error.errors()[:5])
        raise MedpipeError(f"invalid plans: {problems}", path) from None


def read_plans(path: str | Path) -> Plans:
    """plans.json, validated; a missing file says which step writes it."""
    import json

    path = Path(path)
    if not path.is_file():
        raise MedpipeError("no plans: run `medpipe plan` (or the workflow) first", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedpipeError(f"cannot read plans ({error})", path) from None
    return parse_plans(data, path)


def write_plans(plans: Plans, path: str | Path) -> Path:
    return write_json(plans.model_dump(mode="json"), path, finite=True)
