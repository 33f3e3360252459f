"""Networks by name. Importing this package registers every built-in model."""

from medpipe.models import segmentation, voxelmorph  # noqa: F401  (registers the models)
from medpipe.models.registry import (
    MODELS,
    ModelOptions,
    ModelSpec,
    NetworkShape,
    build_model,
    fit_patch_size,
    model_spec,
    parse_options,
    register,
)

__all__ = [
    "MODELS",
    "ModelOptions",
    "ModelSpec",
    "NetworkShape",
    "build_model",
    "fit_patch_size",
    "model_spec",
    "parse_options",
    "register",
]
