"""What a scan must be for a trained model to answer it: checked before any work starts.

Refused (`MedpipeError`; NaN or infinite voxels are refused earlier, by `load_channels`):
scans whose resampled grid cannot fit in this machine's memory (a header
that says 20 mm would otherwise be resampled to ~100 M voxels and killed, or take minutes).
Warned (`ImplausibleInput`, a `UserWarning` the CLI prints as one line): a constant scan
(all zero: there is nothing to segment, yet a network answers something), intensities
orders of magnitude beyond anything in training, and a spacing far from the plans'.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medpipe.device import require_memory
from medpipe.errors import MedpipeError
from medpipe.io import Volume
from medpipe.planning.plans import IntensityProperties

INTENSITY_FACTOR = 100.0  # "far beyond training": 100x the largest magnitude seen
SPACING_FACTOR = 4.0  # a spacing 4x finer or coarser than the plans' on any axis
BYTES_PER_VOXEL_AND_MAP = 4 * 3  # float32 data, probabilities and a resampled copy of them


class ImplausibleInput(UserWarning):
    """The scan is readable, but the answer is unlikely to mean anything."""


def check_scan(volumes: Sequence[Volume], target_spacing: Sequence[float],
               intensities: dict[str, IntensityProperties], classes: int,
               source: Path | str | None = None) -> None:
    """Refuse or warn about VOLUMES (one per channel) before a model of CLASSES outputs,
    trained on INTENSITIES at TARGET_SPACING, predicts them."""
    where = f"{source}: " if source else ""
    for channel, volume in enumerate(volumes):
        array = volume.array  # finite: `load_channels` refused any other
        low, high = float(array.min()), float(array.max())
        if low == high:
            warnings.warn(f"{where}channel {channel} is constant (every voxel {low:g}): there "
                          "is nothing to segment; the prediction means nothing",
                          ImplausibleInput, stacklevel=2)
            continue
        seen = intensities.get(str(channel))
        if seen is not None:
            largest = max(abs(seen.min), abs(seen.max), 1.0)
            if max(abs(low), abs(high)) > INTENSITY_FACTOR * largest:
                warnings.warn(f"{where}channel {channel} spans {low:.3g}..{high:.3g}, far beyond "
                              f"the training scans' {seen.min:.3g}..{seen.max:.3g}",
                              ImplausibleInput, stacklevel=2)
    reference = volumes[0]
    spacing = np.asarray(reference.geometry.spacing, float)
    target = np.asarray(target_spacing, float)
    ratio = spacing / target
    if np.any(ratio > SPACING_FACTOR) or np.any(ratio < 1 / SPACING_FACTOR):
        warnings.warn(f"{where}spacing {tuple(np.round(spacing, 3))} mm is far from the model's "
                      f"{tuple(np.round(target, 3))} mm; check the header",
                      ImplausibleInput, stacklevel=2)
    voxels = float(np.prod(np.asarray(reference.shape) * ratio))
    try:
        require_memory(voxels * (len(volumes) + classes) * BYTES_PER_VOXEL_AND_MAP,
                       torch.device("cpu"), f"resampled to the model's "
                       f"{tuple(np.round(target, 3))} mm this scan ({voxels / 1e6:.0f} M "
                       "voxels; is the header's spacing right?)")
    except MedpipeError as error:
        raise MedpipeError(error.reason, source) from None
