"""The registration loss, as VoxelMorph's: similarity of the warped moving image to the
fixed one (local normalised cross-correlation over 9^3 windows, or MSE) + lambda x diffusion
of the field (mean squared spatial gradient), + optionally gamma x soft Dice of the moving
one-hot labels warped by the same field (VoxelMorph's semi-supervised variant), + optionally
an inverse-consistency term for a batch that holds every pair both ways (`symmetric_batch`):
the mean of |u_AB + u_BA o (id + u_AB)|^2 over both directions (voxels^2), the residual of
going A -> B -> A (ICON, Greer et al. 2021, in displacement form). The similarity and
regularisation parts are MONAI's; everything runs in float32 with autocast off.
Training minimises all of it; instance optimisation its image terms (no labels at
inference). For `voxelmorph_diff` the penalty applies to the integrated displacement MONAI
returns, not to the velocity field VoxelMorph regularises; both penalise a rough warp.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.utils import one_hot
from torch import nn

from medpipe.config import NetworkRegistrationSettings
from medpipe.spatial import compose, full_precision, warp


def symmetric_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(moving, fixed, moving labels, fixed labels) with every pair appended the other way
    round: the first half registers A -> B, the second B -> A (what `inverse_consistency`
    compares)."""
    moving, fixed, *labels = tensors
    swapped = [torch.cat([moving, fixed]), torch.cat([fixed, moving])]
    if labels:
        swapped += [torch.cat([labels[0], labels[1]]), torch.cat([labels[1], labels[0]])]
    return tuple(swapped)


def inverse_consistency(ddf: torch.Tensor) -> torch.Tensor:
    """Mean squared residual of A -> B -> A and B -> A -> B for a symmetric batch's fields
    (first half u_AB, second half u_BA), in voxels^2."""
    forward, backward = ddf.float().chunk(2)
    return 0.5 * (compose(forward, backward).pow(2).mean()
                  + compose(backward, forward).pow(2).mean())


class RegistrationLoss(nn.Module):
    def __init__(self, settings: NetworkRegistrationSettings, n_classes: int,
                 inverse_consistency: float = 0.0) -> None:
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
        self.inverse_consistency = inverse_consistency

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                moving_labels: torch.Tensor, fixed_labels: torch.Tensor,
                labelled: torch.Tensor | None = None,
                global_ddf: torch.Tensor | None = None) -> torch.Tensor:
        """LABELLED (a bool per pair; None: all) marks the pairs whose label maps are real:
        the Dice term is their mean, weighted by their share of the batch, so a pair of
        unlabelled scans adds image terms only and a labelled pair weighs the same in any
        batch. GLOBAL_DDF: the share of DDF a network's global stage made (see
        `image_terms`)."""
        loss = self.image_terms(warped, fixed, ddf, global_ddf=global_ddf)
        with full_precision(ddf):
            if labelled is None:
                labelled = torch.ones(len(ddf), dtype=torch.bool, device=ddf.device)
            if self.dice_weight > 0 and labelled.any():
                rows = labelled.nonzero()[:, 0]
                moved = warp(one_hot(moving_labels[rows], self.n_classes, dim=1), ddf[rows])
                share = len(rows) / len(labelled)
                loss = loss + self.dice_weight * share * self.dice(
                    moved, one_hot(fixed_labels[rows], self.n_classes, dim=1))
            if self.inverse_consistency > 0:
                loss = loss + self.inverse_consistency * inverse_consistency(ddf)
        return loss

    def image_terms(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                    regularisation: float | None = None,
                    global_ddf: torch.Tensor | None = None) -> torch.Tensor:
        """Similarity + weighted diffusion (what instance optimisation minimises: no labels
        at inference). The diffusion is of DDF less GLOBAL_DDF, the displacement of a
        network's affine stage (none: all of DDF): an affine's gradient is the same at
        every voxel, so penalising it would charge a global scaling or rotation everywhere,
        as ANTs and VoxelMorph leave their affine stages unregularised. In fp32 with
        autocast off (casting the inputs is not enough: autocast would run LNCC's box-filter
        convolutions in bf16 again): LNCC divides local variances that bf16 cannot hold;
        under bf16 it diverged to -1e6 within 200 pairs."""
        weight = self.regularisation if regularisation is None else regularisation
        with full_precision(warped):
            local = ddf.float() if global_ddf is None else ddf.float() - global_ddf.float()
            return (self.similarity(warped.float(), fixed.float())
                    + weight * self.smoothness(local))
