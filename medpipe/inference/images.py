"""What users hand to a trained model, and getting the same kind back.

A scan may be a path (any format `read_image` reads), a medpipe `Volume`, a nibabel image or
a SimpleITK image; a multi-channel model takes a sequence of them, one per channel, on one
grid. Results come back as the kind that went in (a path gives a `Volume`), on the input's
exact grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medpipe.errors import MedpipeError
from medpipe.io import Volume, from_nibabel, from_sitk, read_image, to_nibabel, to_sitk

ScanLike = str | Path | Volume | nib.spatialimages.SpatialImage | sitk.Image


def kind_of(scan: ScanLike) -> str:
    if isinstance(scan, sitk.Image):
        return "sitk"
    if isinstance(scan, nib.spatialimages.SpatialImage):
        return "nibabel"
    return "volume"


def load_scan(scan: ScanLike) -> Volume:
    """One 3D scan as a Volume; a 2D or 4D scan is refused with what to do instead."""
    if isinstance(scan, str | Path):
        volume = read_image(scan)
        name: str | Path | None = Path(scan)
    elif isinstance(scan, Volume):
        volume, name = scan, None
    elif isinstance(scan, sitk.Image):
        if scan.GetDimension() != 3:
            raise MedpipeError(f"expected a 3D scan, got a {scan.GetDimension()}D image")
        volume, name = from_sitk(scan), None
    elif isinstance(scan, nib.spatialimages.SpatialImage):
        volume, name = from_nibabel(scan), getattr(scan, "get_filename", lambda: None)()
    else:
        raise MedpipeError(f"cannot read a scan from a {type(scan).__name__}; give a path, "
                           "a nibabel image, a SimpleITK image or a medpipe Volume")
    if volume.array.ndim != 3:
        shape = "x".join(str(n) for n in volume.array.shape)
        advice = ("give each channel as its own 3D scan" if volume.array.ndim == 4
                  else "medpipe models take 3D scans")
        raise MedpipeError(f"expected a 3D scan, got {volume.array.ndim}D data of shape "
                           f"{shape}; {advice}", name)
    return volume


def load_channels(scans: ScanLike | Sequence[ScanLike], channels: int,
                  ) -> tuple[list[Volume], str]:
    """The channels of one case (checked: count and grid), and the kind to answer in."""
    items = list(scans) if isinstance(scans, list | tuple) else [scans]
    if len(items) != channels:
        raise MedpipeError(f"the model takes {channels} channel(s) per scan, got {len(items)}",
                           items[0] if isinstance(items[0], str | Path) else None)
    volumes = [load_scan(item) for item in items]
    for item, volume in zip(items, volumes, strict=True):
        if np.issubdtype(volume.array.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(volume.array)))
            if bad:  # every answer from such a scan would be NaN or arbitrary
                raise MedpipeError(f"{bad} of {volume.array.size} voxels are NaN or "
                                   "infinite; refused", item if isinstance(item, str | Path)
                                   else None)
    for item, volume in zip(items[1:], volumes[1:], strict=True):
        if volume.shape != volumes[0].shape or \
                not volume.geometry.is_close(volumes[0].geometry):
            raise MedpipeError("channels of one scan must share one grid",
                               item if isinstance(item, str | Path) else None)
    return volumes, kind_of(items[0])


def as_kind(volume: Volume, kind: str) -> Any:
    """VOLUME as the kind the caller passed in."""
    if kind == "sitk":
        return to_sitk(volume)
    if kind == "nibabel":
        return to_nibabel(volume)
    return volume


def stack_channels(volumes: Sequence[Volume]) -> np.ndarray:
    return np.stack([v.array for v in volumes]).astype(np.float32)
