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
import torch.nn.functional as F
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
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
        # in fp32 with autocast off (casting the inputs is not enough: autocast would run
        # LNCC's box-filter convolutions in bf16 again): LNCC divides local variances that
        # bf16 cannot hold; under bf16 it diverged to -1e6 within 200 pairs
        with torch.autocast(warped.device.type, enabled=False):
            return self._loss(warped.float(), fixed.float(), ddf.float(), moving_labels,
                              fixed_labels)

    def image_terms(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                    regularisation: float | None = None) -> torch.Tensor:
        """Similarity + weighted diffusion, in fp32 (what instance optimisation minimises:
        no labels at inference)."""
        weight = self.regularisation if regularisation is None else regularisation
        with torch.autocast(warped.device.type, enabled=False):
            warped, ddf = warped.float(), ddf.float()
            return self.similarity(warped, fixed.float()) + weight * self.smoothness(ddf)

    def _loss(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
              moving_labels: torch.Tensor, fixed_labels: torch.Tensor) -> torch.Tensor:
        loss = self.image_terms(warped, fixed, ddf)
        if self.dice_weight > 0:
            moved = self.warp_labels(one_hot(moving_labels, self.n_classes), ddf)
            loss = loss + self.dice_weight * self.dice(moved, one_hot(fixed_labels,
                                                                      self.n_classes))
        return loss


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, 1, X, Y, Z) integer labels -> (B, K, X, Y, Z) float one-hot."""
    return F.one_hot(labels[:, 0], n_classes).movedim(-1, 1).float()
