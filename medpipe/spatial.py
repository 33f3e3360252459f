"""Spatial transforms in float32, whatever autocast is on: warping an image or a label map
by a displacement field, integrating a velocity field, composing two fields.

Why here and not inside each network: mixed precision is for a network's own layers, never
for geometry. MONAI's `Warp` builds its sampling grid in the field's dtype, so a bf16 field
puts sampling positions on a lattice of 0.25-0.5 voxel at the sizes of a brain grid
(measured: a bf16 field through `Warp` changed a [0, 1] image by 0.04 on average, 0.38 at
most), and scaling and squaring in bf16 compounds that error at every squaring. Casting the
inputs is not enough: under `torch.autocast` grid_sample and convolutions run in the lower
precision again, so every function here turns autocast off for its own body.

Fields are MONAI's convention (`Warp`): (B, 3, X, Y, Z) displacements in voxels of the grid
they lie on, channel c along array axis c; the warped image at x is image(x + ddf(x)).
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch
from monai.networks.blocks import DVF2DDF, Warp


@contextlib.contextmanager
def full_precision(tensor: torch.Tensor):
    """A context with autocast off on TENSOR's device type and TF32 off: on an Ampere or
    newer GPU cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa), which would
    bring back the cancellation in LNCC's local variances that autocast off avoids."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        with torch.autocast(tensor.device.type, enabled=False):
            yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@cache
def _warper(mode: str, padding_mode: str) -> Warp:
    return Warp(mode=mode, padding_mode=padding_mode)


@cache
def _integrator(steps: int) -> DVF2DDF:
    return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """IMAGE (B, C, X, Y, Z) sampled at x + DDF(x), in float32."""
    with full_precision(ddf):
        return _warper(mode, padding_mode)(image.float(), ddf.float())


def integrate(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """exp(VELOCITY): a stationary velocity field integrated by scaling and squaring
    (STEPS squarings, MONAI's `DVF2DDF`), in float32; a diffeomorphism where the velocity
    is smooth enough for each scaled step to be invertible."""
    with full_precision(velocity):
        return _integrator(steps)(velocity.float())


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The displacement of x -> y + INNER(y) at y = x + OUTER(x): first OUTER, then INNER.

    A network that warped the moving image by INNER and then predicted OUTER on the warped
    image registers with this: moving(y + inner(y)) at y = x + outer(x). Border padding:
    a point pushed past the grid keeps the border's displacement instead of snapping back
    to zero."""
    with full_precision(outer):
        outer = outer.float()
        return outer + _warper("bilinear", "border")(inner.float(), outer)


def upsample_field(ddf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """DDF on a grid of SHAPE covering the same region (outer voxel edges kept, trilinear),
    its displacements rescaled from the coarse voxels to the fine ones, in float32."""
    with full_precision(ddf):
        scale = torch.tensor([n / m for n, m in zip(shape, ddf.shape[2:], strict=True)],
                             device=ddf.device).view(1, -1, 1, 1, 1)
        return torch.nn.functional.interpolate(ddf.float(), size=tuple(shape),
                                               mode="trilinear", align_corners=False) * scale


def voxel_map_field(voxel_maps: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, *SHAPE) displacements, in voxels, of the affine maps VOXEL_MAPS (B, 4, 4:
    voxel index x on this grid -> index M x on another, column vectors), in float32: with
    `warp`, an image on the other grid resampled onto this one."""
    with full_precision(voxel_maps):
        axes = [torch.arange(n, device=voxel_maps.device, dtype=torch.float32) for n in shape]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)  # (3, N)
        maps = voxel_maps.float()
        moved = maps[:, :3, :3] @ points + maps[:, :3, 3:]  # (B, 3, N)
        return (moved - points).reshape(len(maps), 3, *shape)
