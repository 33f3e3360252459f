"""VoxelMorph-style registration networks, entirely MONAI parts.

`voxelmorph`: MONAI `VoxelMorphUNet` on the concatenated (moving, fixed) images predicts a
dense displacement field (ddf, in voxels, channel order = array axes) that MONAI's `Warp`
applies to the moving image. `voxelmorph_diff`: the same net predicts a stationary velocity
field, integrated by scaling and squaring (`DVF2DDF`, 7 steps), optionally at half resolution
and upsampled. Default channels are VoxelMorph's: encoder 16-32-32-32, decoder 32-32-32-32-32-16-16.
Forward: `net(moving, fixed) -> (warped moving, ddf)`.
"""

from __future__ import annotations

from monai.networks.nets import VoxelMorph, VoxelMorphUNet
from pydantic import Field

from medpipe.config import OptimizerConfig
from medpipe.models.registry import ModelOptions, ModelSpec, NetworkShape, register

ADAM = OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.0, schedule="constant")  # VoxelMorph


class VoxelMorphOptions(ModelOptions):
    channels: tuple[int, ...] = (16, 32, 32, 32, 32, 32)  # encoder levels, mirrored upwards
    final_conv_channels: tuple[int, ...] = (16, 16)
    unet_out_channels: int = Field(32, gt=0)
    integration_steps: int = Field(0, ge=0)  # 0: the field is the displacement itself
    half_resolution: bool = False


class DiffeomorphicOptions(VoxelMorphOptions):
    integration_steps: int = Field(7, ge=1)  # scaling and squaring, as VoxelMorph-diff


def build_voxelmorph(shape: NetworkShape, options: VoxelMorphOptions) -> VoxelMorph:
    backbone = VoxelMorphUNet(
        spatial_dims=3,
        in_channels=2 * shape.in_channels,  # moving and fixed, concatenated
        unet_out_channels=options.unet_out_channels,
        channels=options.channels,
        final_conv_channels=options.final_conv_channels,
    )
    return VoxelMorph(
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
