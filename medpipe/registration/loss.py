"""The registration loss, as VoxelMorph's: similarity of the warped moving image to the
fixed one (local normalised cross-correlation over 9^3 windows, or MSE) + lambda x diffusion
of the field (mean squared spatial gradient), + optionally gamma x soft Dice of the moving
one-hot labels warped by the same field (VoxelMorph's semi-supervised variant). All parts are
MONAI's. Training minimises all of it; instance optimisation its image terms (no labels at
inference). For `voxelmorph_diff` the penalty applies to the integrated displacement MONAI
returns, not to the velocity field VoxelMorph regularises; both penalise a rough warp.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.utils import one_hot
from torch import nn

from medpipe.config import NetworkRegistrationSettings


class RegistrationLoss(nn.Module):
    def __init__(self, settings: NetworkRegistrationSettings, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.similarity = (
            LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=settings.lncc_window)
            if settings.similarity == "lncc" else nn.MSELoss()
        )
        self.smoothness = DiffusionLoss()
        self.regularisation = settings.regularisation
        self.dice_weight = settings.dice_weight
        self.dice = DiceLoss(include_background=False)
        self.warp_labels = Warp(mode="bilinear", padding_mode="zeros")

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                moving_labels: torch.Tensor, fixed_labels: torch.Tensor) -> torch.Tensor:
        loss = self.image_terms(warped, fixed, ddf)
        if self.dice_weight > 0:
            with torch.autocast(ddf.device.type, enabled=False):
                moved = self.warp_labels(one_hot(moving_labels, self.n_classes, dim=1),
                                         ddf.float())
                loss = loss + self.dice_weight * self.dice(
                    moved, one_hot(fixed_labels, self.n_classes, dim=1))
        return loss

    def image_terms(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                    regularisation: float | None = None) -> torch.Tensor:
        """Similarity + weighted diffusion (what instance optimisation minimises: no labels
        at inference). In fp32 with autocast off (casting the inputs is not enough: autocast
        would run LNCC's box-filter convolutions in bf16 again): LNCC divides local
        variances that bf16 cannot hold; under bf16 it diverged to -1e6 within 200 pairs."""
        weight = self.regularisation if regularisation is None else regularisation
        with torch.autocast(warped.device.type, enabled=False):
            return (self.similarity(warped.float(), fixed.float())
                    + weight * self.smoothness(ddf.float()))
