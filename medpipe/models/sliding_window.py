"""Whole-volume prediction from a patch-trained network, as nnU-Net predicts.

MONAI's `sliding_window_inference` with Gaussian importance weighting (sigma = patch/8, as
nnU-Net) and half-patch overlap; optional mirroring test-time augmentation averages the
softmax over all flips of the mirror axes, like nnU-Net's `use_mirroring`.
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
) -> torch.Tensor:
    """Softmax (K, X, Y, Z) on the CPU for one preprocessed image (C, X, Y, Z); with SIGMOID,
    each channel's own probability (region-based nets, whose channels overlap)."""
    model.eval()
    inputs = torch.as_tensor(image, dtype=torch.float32)[None].to(device)

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
            )
            logits = logits.float()
            probabilities = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
            if dims:
                probabilities = torch.flip(probabilities, dims)
            total = probabilities if total is None else total + probabilities
    return (total / len(flips))[0].cpu()
