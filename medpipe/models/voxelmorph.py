"""VoxelMorph-style registration networks, entirely MONAI parts.

`voxelmorph`: MONAI `VoxelMorphUNet` on the concatenated (moving, fixed) images predicts a
dense displacement field (ddf, in voxels, channel order = array axes) that MONAI's `Warp`
applies to the moving image. `voxelmorph_diff`: the same net predicts a stationary velocity
field, integrated by scaling and squaring (`DVF2DDF`, 7 steps), optionally at half resolution
and upsampled. Default channels are VoxelMorph's: encoder 16-32-32-32, decoder 32-32-32-32-32-16-16.
Forward: `net(moving, fixed) -> (warped moving, ddf)`; the U-Net runs in whatever precision
autocast gives it, the field's resampling, integration and the warp in float32
(`medpipe.spatial`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import VoxelMorph, VoxelMorphUNet
from pydantic import Field

from medpipe.models.registry import ModelSpec, NetworkShape, RegistrationOptions, register
from medpipe.spatial import full_precision, integrate, warp
from medpipe.training_settings import OptimizerConfig

ADAM = OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.0, schedule="constant")  # VoxelMorph


class VoxelMorphOptions(RegistrationOptions):
    channels: tuple[int, ...] = (16, 32, 32, 32, 32, 32)  # encoder levels, mirrored upwards
    final_conv_channels: tuple[int, ...] = (16, 16)
    unet_out_channels: int = Field(32, gt=0)
    integration_steps: int = Field(0, ge=0)  # 0: the field is the displacement itself
    half_resolution: bool = False


class DiffeomorphicOptions(VoxelMorphOptions):
    integration_steps: int = Field(7, ge=1)  # scaling and squaring, as VoxelMorph-diff


class FullPrecisionVoxelMorph(VoxelMorph):
    """MONAI's VoxelMorph (same parameters, same state dict) whose transform part, after the
    U-Net, runs in float32 with autocast off: MONAI's own runs it in the autocast dtype."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                parts: bool = False) -> tuple[torch.Tensor, ...]:
        """(warped moving, ddf), and with PARTS None: no global stage (every registration
        network's signature; see `models.pyramid`)."""
        warped, ddf = self.transform(moving, self.backbone(torch.cat([moving, fixed], dim=1)))
        return (warped, ddf, None) if parts else (warped, ddf)

    def transform(self, moving: torch.Tensor,
                  field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(warped MOVING, ddf) from the U-Net's output FIELD, in float32. At half resolution
        the displacements are halved with the grid and doubled back, as VoxelMorph's
        `ResizeTransform` does (MONAI 1.6 scales them the other way round, which integrates
        a velocity 4x too large for its grid)."""
        with full_precision(field):
            x = field.float()
            if self.half_res:
                x = F.interpolate(x, scale_factor=0.5, mode="trilinear",
                                  align_corners=True) * 0.5
            if self.diffeomorphic:
                x = integrate(x, self.integration_steps)
            if self.half_res:
                x = F.interpolate(x * 2.0, scale_factor=2.0, mode="trilinear",
                                  align_corners=True)
            return warp(moving, x), x


def build_voxelmorph(shape: NetworkShape, options: VoxelMorphOptions) -> VoxelMorph:
    backbone = VoxelMorphUNet(
        spatial_dims=3,
        in_channels=2 * shape.in_channels,  # moving and fixed, concatenated
        unet_out_channels=options.unet_out_channels,
        channels=options.channels,
        final_conv_channels=options.final_conv_channels,
    )
    return FullPrecisionVoxelMorph(
        backbone=backbone,
        integration_steps=options.integration_steps,
        half_res=options.half_resolution,
        spatial_dims=3,
    )


def voxelmorph_divisor(shape: NetworkShape, options: VoxelMorphOptions) -> tuple[int, int, int]:
    # the encoder halves the grid once per level pair; half resolution halves it once more
    levels = len(options.channels) // 2 + (1 if options.half_resolution else 0)
    return (2**levels,) * 3


register(
    ModelSpec(
        name="voxelmorph",
        task="registration",
        options=VoxelMorphOptions,
        build=build_voxelmorph,
        patch_divisor=voxelmorph_divisor,
        optimizer_defaults=ADAM,
        description="VoxelMorph U-Net predicting a displacement field (MONAI)",
    )
)
register(
    ModelSpec(
        name="voxelmorph_diff",
        task="registration",
        options=DiffeomorphicOptions,
        build=build_voxelmorph,
        patch_divisor=voxelmorph_divisor,
        optimizer_defaults=ADAM,
        description="VoxelMorph-diff: velocity field integrated by scaling and squaring (MONAI)",
    )
)
