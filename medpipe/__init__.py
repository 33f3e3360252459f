"""medpipe: reproducible 3D medical image segmentation and registration."""

from medpipe.errors import MedpipeError
from medpipe.io import Geometry, Volume, read_image, write_image

__all__ = ["Geometry", "MedpipeError", "Volume", "read_image", "write_image"]
__version__ = "0.1.0"
