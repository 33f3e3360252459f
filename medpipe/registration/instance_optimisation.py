"""Instance optimisation: a network's predicted field refined on one pair at inference.

The top Learn2Reg entries and uniGradICON's IO take the network's prediction as the start
and run a few gradient steps per pair on an unsupervised loss; the network's amortised
guess gets the last bit of accuracy a per-pair optimiser finds, at a fraction of that
optimiser's cost from scratch. Here: Adam on a stationary velocity field v (on the
network's grid), the refined map being the network's composed with exp(G v) (G: a Gaussian
of 1 voxel; exp: scaling and squaring, `medpipe.spatial.integrate`, 4 steps):
x -> x + w(x) + u(x + w(x)), w = exp(G v), u the network's displacement. It minimises the
network's own training loss without its label term (LNCC or MSE of the warped moving image
to the fixed one, plus the diffusion penalty on the whole displacement but a global stage's
affine).

Why this parametrisation, as measured (demo, 6 pairs; a known warp in the tests): Adam on
the displacement itself folded 0.15-0.18 % of voxels (the network alone: 0.0006 %) whatever
the diffusion weight; on an unsmoothed velocity 0.03-0.15 % on the known warp. Adam moves
every voxel by about the same step, so where the image says little the update is noise; the
Gaussian makes the update smooth and left no folded voxel, with a lower end-point error.
Four squarings, not VoxelMorph's seven: on the demo the same Dice (0.742 for both, 25 steps)
in 1.7 s a pair instead of 3.1 s.
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter

from medpipe.config import InstanceOptimisationSettings
from medpipe.registration.loss import RegistrationLoss
from medpipe.spatial import compose, full_precision, integrate, warp

SMOOTHING_VOXELS = 1.0  # sigma of the Gaussian on the velocity
SQUARINGS = 4


def instance_optimise(ddf: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                      loss: RegistrationLoss, settings: InstanceOptimisationSettings,
                      global_ddf: torch.Tensor | None = None) -> torch.Tensor:
    """DDF (1, 3, X, Y, Z, voxels) after SETTINGS.steps Adam steps on LOSS's image terms
    for MOVING warped onto FIXED (both (1, C, X, Y, Z) on the ddf's grid); fp32, autocast
    off whatever the caller has on. GLOBAL_DDF: the network's affine share of DDF, left out
    of the diffusion penalty as in training."""
    ddf = ddf.detach().float()
    moving, fixed = moving.float(), fixed.float()
    velocity = torch.zeros_like(ddf, requires_grad=True)
    optimiser = torch.optim.Adam([velocity], lr=settings.lr)
    smooth = GaussianFilter(3, sigma=SMOOTHING_VOXELS)

    def refined() -> torch.Tensor:
        return compose(integrate(smooth(velocity), SQUARINGS), ddf)

    with torch.enable_grad(), full_precision(ddf):
        for _ in range(settings.steps):
            optimiser.zero_grad(set_to_none=True)
            field = refined()
            value = loss.image_terms(warp(moving, field, padding_mode="border"), fixed, field,
                                     settings.regularisation, global_ddf)
            value.backward()
            optimiser.step()
        with torch.no_grad():
            return refined()
