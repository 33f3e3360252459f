"""Whole-volume prediction from a patch-trained network, as nnU-Net predicts.

MONAI's `sliding_window_inference` with Gaussian importance weighting (sigma = patch/8, as
nnU-Net) and half-patch overlap; optional mirroring test-time augmentation averages the
softmax over all flips of the mirror axes, like nnU-Net's `use_mirroring`.

The windows run on the model's device; the whole-volume sums (logits, importance counts, the
mirrored sum) are kept there only when they fit (`accumulation_device`): a large CT on a GPU
accumulates in host memory instead, as nnU-Net's predictor falls back to the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn


def main_output(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of nets that return several (deep supervision)."""
    if isinstance(output, list | tuple):
        return output[0]
    return output


ACCUMULATION_SHARE = 0.5  # of the device's free memory the whole-volume sums may take


def accumulation_bytes(shape: Sequence[int], classes: int, mirrored: bool) -> int:
    """Bytes the whole-volume sums of one prediction hold on the device: MONAI's output and
    count maps and its importance-weighted copy (about 3 x classes floats a voxel, plus a
    count), the softmax, and with mirroring the running sum of the flips."""
    voxels = int(np.prod(shape))
    return 4 * voxels * ((4 + int(mirrored)) * classes + 1)


def accumulation_device(device: torch.device, shape: Sequence[int], classes: int,
                        mirrored: bool, budget_bytes: int | None = None) -> torch.device:
    """DEVICE when the whole-volume sums fit in ACCUMULATION_SHARE of its free memory (or of
    BUDGET_BYTES, when given), else the CPU; a CPU device is its own answer."""
    if device.type == "cpu":
        return device
    if budget_bytes is None:
        free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
        budget_bytes = int(ACCUMULATION_SHARE * free)
    needed = accumulation_bytes(shape, classes, mirrored)
    return device if needed <= budget_bytes else torch.device("cpu")


def predict_probabilities(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    device: torch.device,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    sigmoid: bool = False,
    classes: int | None = None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """Softmax (K, X, Y, Z) on the CPU for one preprocessed image (C, X, Y, Z); with SIGMOID,
    each channel's own probability (region-based nets, whose channels overlap). The windows
    run on DEVICE; the sums where `accumulation_device` says (CLASSES: the network's
    outputs, for its estimate; BUDGET_BYTES: the memory they may take, by default a share of
    the device's free memory)."""
    model.eval()
    spatial = tuple(int(n) for n in image.shape[1:])
    accumulate = (accumulation_device(device, spatial, classes, bool(mirror_axes), budget_bytes)
                  if classes else device)
    inputs = torch.as_tensor(image, dtype=torch.float32)[None].to(accumulate)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return main_output(model(patch)).float()

    flips = [()] + [
        combo for r in range(1, len(mirror_axes) + 1)
        for combo in itertools.combinations(mirror_axes, r)
    ]
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    total = None
    with torch.no_grad(), autocast:
        for flip in flips:
            dims = [axis + 2 for axis in flip]
            flipped = torch.flip(inputs, dims) if dims else inputs
            logits = sliding_window_inference(
                flipped,
                roi_size=tuple(int(p) for p in patch_size),
                sw_batch_size=batch_size,
                predictor=predictor,
                overlap=overlap,
                mode="gaussian",
                sigma_scale=0.125,
                padding_mode="constant",
                cval=0.0,
                sw_device=device,
                device=accumulate,
            )
            logits = logits.float()
            probabilities = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
            if dims:
                probabilities = torch.flip(probabilities, dims)
            total = probabilities if total is None else total + probabilities
    return (total / len(flips))[0].cpu()
