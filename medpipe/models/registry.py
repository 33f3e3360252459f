"""The model registry: a name maps to one builder, its typed options and its training defaults.

Adding a model is one builder function and one `register(ModelSpec(...))` call; nothing else
in the pipeline (training, evaluation, inference, the workflow) names a model class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.planning.plans import ArchitectureKwargs
from medpipe.training_settings import OptimizerConfig, TrainingConfig

Task = Literal["segmentation", "registration"]


class ModelOptions(BaseModel):
    """Base of every model's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistrationOptions(ModelOptions):
    """Options every registration network has: the training terms that belong to the
    model's method rather than to the data (`registration.*` settings are shared)."""

    inverse_consistency: float = Field(
        0.0, ge=0, description="weight of the inverse-consistency term: each training pair "
        "registered both ways in one batch, |u_AB + u_BA o (id + u_AB)|^2 penalised; 0: off")


@dataclass(frozen=True)
class NetworkShape:
    """What a builder needs to know about the data: channels and the planned topology."""

    in_channels: int
    out_channels: int
    architecture: ArchitectureKwargs | None = None  # the plans' topology, where it is used


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: Task
    options: type[ModelOptions]
    build: Callable[[NetworkShape, Any], nn.Module]
    # every patch axis must be a multiple of this, for the net's down/up-sampling to line up
    patch_divisor: Callable[[NetworkShape, Any], Sequence[int]]
    # optimiser and schedule the literature trains this model with (see `training.optim`)
    optimizer_defaults: OptimizerConfig
    description: str = ""
    min_patch_size: int = 0  # smallest patch edge the net can train on
    # `recipe: native`: the training settings its authors' code sets (only those fields;
    # None: the optimiser defaults alone), and where they come from
    recipe: TrainingConfig | None = None
    recipe_source: str = ""
    needs_residual_plans: bool = False  # built from a ResEnc planner's plans

    @property
    def native_recipe(self) -> TrainingConfig:
        return self.recipe or TrainingConfig(optimizer=self.optimizer_defaults)


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str, task: Task | None = None) -> ModelSpec:
    """The spec registered under NAME; a clear error lists the names that exist."""
    spec = MODELS.get(name)
    if spec is None or (task is not None and spec.task != task):
        known = ", ".join(sorted(n for n, s in MODELS.items() if task in (None, s.task)))
        kind = f"{task} models" if task else "models"
        raise MedpipeError(f"unknown model {name!r}; known {kind}: {known}")
    return spec


def parse_options(name: str, options: dict[str, Any] | None) -> ModelOptions:
    spec = model_spec(name)
    try:
        return spec.options(**(options or {}))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise MedpipeError(f"invalid options for model {name!r}: {problems}") from None


def build_model(
    name: str, shape: NetworkShape, options: dict[str, Any] | ModelOptions | None = None
) -> nn.Module:
    """Build the registered network NAME for data of SHAPE with OPTIONS (validated)."""
    spec = model_spec(name)
    if not isinstance(options, ModelOptions):
        options = parse_options(name, options)
    return spec.build(shape, options)


def fit_patch_size(
    name: str,
    patch_size: Sequence[int],
    shape: NetworkShape,
    options: dict[str, Any] | ModelOptions | None = None,
) -> tuple[int, ...]:
    """The planned patch rounded down (never below one multiple) to what the net accepts.

    Rounding down keeps a model at or under the planner's memory budget; the planned CNN
    patch is already a multiple of its pooling, so only other nets change it.
    """
    spec = model_spec(name)
    if not isinstance(options, ModelOptions):
        options = parse_options(name, options)
    divisors = spec.patch_divisor(shape, options)
    return tuple(
        max(d, spec.min_patch_size, (p // d) * d)
        for p, d in zip(patch_size, divisors, strict=True)
    )
