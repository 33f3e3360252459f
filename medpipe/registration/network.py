"""A trained registration network applied to one pair: the field on the fixed scan's grid.

Shared by `evaluate-reg` and the public API, so what is scored is what users run: pre-align
the pair directly (one SimpleITK affine, as for any new pair; training composed per-case
affines instead, cheaper for many pairs and a little rougher; or the centres of mass
matched, which costs milliseconds and leaves only forward passes), resample to the network's
grid, predict (optionally refining the prediction per pair: `instance_optimisation`), and
compose both into an ITK displacement field (`registration.fields`).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from medpipe.config import ClassicalSettings, InstanceOptimisationSettings
from medpipe.device import autocast, autocast_dtype
from medpipe.io import Geometry
from medpipe.planning.plans import Plans
from medpipe.registration.classical import register_classical
from medpipe.registration.fields import affine_matrix, compose_field, resample_ddf
from medpipe.registration.instance_optimisation import instance_optimise
from medpipe.registration.loss import RegistrationLoss
from medpipe.registration.pairs import (
    RegistrationCase,
    moments_matrix,
    pair_arrays,
    resample_case,
)
from medpipe.runs.spec import RegistrationRunSpec


class NetworkRegistration:
    """`(moving, fixed, target grid) -> ITK field` for one trained network, refined per
    pair when INSTANCE_OPTIMISATION has steps. Cases may come at any spacing (the
    preprocessed grid in the evaluation, a new scan's own in `load_registrator`): each is
    resampled to the network's grid, SPACING (mm; `network_spacing`), and for a refinement
    on a grid of its own to that one too."""

    def __init__(self, network: torch.nn.Module, spec: RegistrationRunSpec,
                 device: torch.device, spacing: tuple[float, float, float],
                 instance_optimisation: InstanceOptimisationSettings | None = None,
                 amp: bool = True) -> None:
        self.network = network.to(device).eval()
        self.spec = spec
        self.device = device
        self.spacing = tuple(spacing)
        self.dtype = autocast_dtype(device, amp)
        self.refinement = instance_optimisation if instance_optimisation and \
            instance_optimisation.steps else None
        self.loss = (RegistrationLoss(spec.registration, n_classes=len(spec.labels))
                     if self.refinement else None)

    @property
    def classical(self) -> ClassicalSettings:
        return self.spec.classical

    def prealign(self, moving: RegistrationCase, fixed: RegistrationCase) -> np.ndarray:
        """4x4 LPS matrix taking fixed points into the moving scan (identity without)."""
        mode = self.spec.registration.prealign
        if mode == "moments":
            return moments_matrix(moving, fixed)
        if mode != "affine":
            return np.eye(4)
        return affine_matrix(register_classical(fixed.volume(), moving.volume(),
                                                self.classical))

    def ddf(self, moving: RegistrationCase, fixed: RegistrationCase,
            matrix: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """The voxel field on the grid it was made on (the network's padded fixed grid, or
        the refinement's), and that grid."""
        coarse_moving, coarse_fixed = (resample_case(c, self.spacing) for c in (moving, fixed))
        moving_image, fixed_image = self._images(coarse_moving, coarse_fixed, matrix,
                                                 self.spec.grid_shape)
        with torch.no_grad(), autocast(self.device, self.dtype):
            _, ddf, global_ddf = self.network(moving_image, fixed_image, parts=True)
        grid = coarse_fixed.geometry
        if self.refinement is None:
            return ddf[0].float().cpu().numpy(), grid
        if self.refinement.spacing is not None:  # the prediction onto the refinement's grid
            moving, fixed = (resample_case(c, self.refinement.spacing) for c in (moving, fixed))
            ddf, global_ddf = (
                None if field is None else resample_ddf(
                    field[0].float().cpu(), grid, fixed.geometry, fixed.shape)[None].to(
                    self.device)
                for field in (ddf, global_ddf))
            grid = fixed.geometry
            moving_image, fixed_image = self._images(moving, fixed, matrix, fixed.shape)
        refined = instance_optimise(ddf, moving_image, fixed_image, self.loss, self.refinement,
                                    global_ddf)
        return refined[0].float().cpu().numpy(), grid

    def _images(self, moving: RegistrationCase, fixed: RegistrationCase, matrix: np.ndarray,
                shape) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = pair_arrays(moving, fixed, matrix, shape)
        return (torch.from_numpy(arrays["moving"])[None].to(self.device),
                torch.from_numpy(arrays["fixed"])[None].to(self.device))

    def __call__(self, moving: RegistrationCase, fixed: RegistrationCase,
                 target: Geometry, target_shape: tuple[int, int, int]) -> sitk.Image:
        matrix = self.prealign(moving, fixed)
        ddf, grid = self.ddf(moving, fixed, matrix)
        return compose_field(target, target_shape, ddf, grid, matrix)


def network_spacing(spec: RegistrationRunSpec, plans: Plans) -> tuple[float, float, float]:
    """The grid a network runs on (mm): `registration.spacing`, else the plans' spacing."""
    return tuple(spec.registration.spacing or plans.configuration(spec.configuration).spacing)
