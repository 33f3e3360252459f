"""Networks by name. Importing this package registers every built-in model."""

from medpipe.models import pyramid, segmentation, voxelmorph  # noqa: F401  (registers)
from medpipe.models.registry import (
    MODELS,
    ModelOptions,
    ModelSpec,
    NetworkShape,
    RegistrationOptions,
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
    "RegistrationOptions",
    "build_model",
    "fit_patch_size",
    "model_spec",
    "parse_options",
    "register",
]
