"""medpipe: reproducible 3D medical image segmentation and registration."""

import warnings
from typing import Any

from medpipe.errors import MedpipeError

# MONAI says on every Warp it builds that it uses torch's grid_sample (its own CUDA kernel
# is not installed); that is the intended path, and the line would bury medpipe's own
# one-line messages on every `register`
warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native",
                        category=UserWarning)

__all__ = [
    "Geometry",
    "MedpipeError",
    "Volume",
    "load_registrator",
    "load_segmenter",
    "read_image",
    "write_image",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The model loaders import torch and MONAI, the volume I/O nibabel and SimpleITK: only
    when first used, so that `import medpipe` (and `medpipe --help`) stay quick."""
    if name in ("Geometry", "Volume", "read_image", "write_image"):
        from medpipe import io

        return getattr(io, name)
    if name == "load_segmenter":
        from medpipe.inference.segmenter import load_segmenter

        return load_segmenter
    if name == "load_registrator":
        from medpipe.inference.registrator import load_registrator

        return load_registrator
    raise AttributeError(f"module 'medpipe' has no attribute {name!r}")
