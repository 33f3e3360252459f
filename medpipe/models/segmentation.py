"""The three segmentation baselines, each built from MONAI parts.

- `unet`: MONAI `UNet` with residual units and instance norm (a strong, plain CNN);
- `swin_unetr`: MONAI `SwinUNETR` (a transformer encoder with a CNN decoder);
- `nnunet`: MONAI `DynUNet` configured from `plans.json` exactly as nnU-Net would build its
  PlainConvUNet: kernel sizes, strides and features per stage, instance norm, leaky ReLU,
  deep supervision on the decoder's upper levels;
- `nnunet_resenc`: nnU-Net's ResidualEncoderUNet from plans of a ResEnc planner, built by
  nnU-Net's own network package (`models.resenc`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet, SwinUNETR, UNet
from pydantic import Field, field_validator
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.models.registry import ModelOptions, ModelSpec, NetworkShape, register
from medpipe.training_settings import OptimizerConfig, TrainingConfig

# optimiser defaults from the papers / reference code of each model (see training.optim)
ADAMW_COSINE = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-5, schedule="cosine")
NNUNET_SGD = OptimizerConfig(name="sgd", lr=1e-2, momentum=0.99, nesterov=True,
                             weight_decay=3e-5, schedule="poly")

# `recipe: native`: each model as its authors' code trains it (the fields set here replace the
# shared `training`; the budget stays shared). The loss stays medpipe's Dice + cross-entropy
# for all (the spleen tutorial's is Dice alone).
# nnU-Net v2's nnUNetTrainer: SGD 1e-2 (momentum 0.99, Nesterov, weight decay 3e-5), poly
# 0.9, gradient norm clipped at 12, its augmentation, the plans' patch and batch, a third of
# each batch centred on foreground; deep supervision is the model's option (on by default)
NNUNET_RECIPE = TrainingConfig(optimizer=NNUNET_SGD, augment=True, patch_size=None,
                               batch_size=None, oversample_foreground=0.33, grad_clip=12.0)
NNUNET_SOURCE = ("nnU-Net v2's nnUNetTrainer: SGD 0.01, momentum 0.99 (Nesterov), weight "
                 "decay 3e-5, poly 0.9, deep supervision, its augmentation, planned patch and "
                 "batch, gradient clip 12")
# MONAI's spleen tutorial (Project-MONAI/tutorials 3d_segmentation/spleen_segmentation_3d):
# UNet(channels 16..256, 2 residual units), Adam 1e-4, no schedule, crops centred on
# foreground and background alike (RandCropByPosNegLabeld pos 1, neg 1), no augmentation
# (its RandAffined is commented out), no clipping
MONAI_UNET_RECIPE = TrainingConfig(
    optimizer=OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.0, schedule="constant"),
    augment=False, oversample_foreground=0.5, grad_clip=None)
MONAI_UNET_SOURCE = ("MONAI's spleen tutorial: Adam 1e-4, no schedule, no augmentation, "
                     "half the patches on foreground, no clipping")
# MONAI's Swin-UNETR BTCV tutorial (3d_segmentation/swin_unetr_btcv_segmentation_3d): AdamW
# 1e-4, weight decay 1e-5, no schedule, pos 1 / neg 1 crops, no clipping; its flips and 90
# degree rotations (p 0.1) and intensity shifts (p 0.5) have no medpipe setting (medpipe's
# augmentation is nnU-Net's, far stronger), so augmentation is off; it starts from
# self-supervised weights, which nothing here may download: trained from scratch
MONAI_SWIN_RECIPE = TrainingConfig(
    optimizer=OptimizerConfig(name="adamw", lr=1e-4, weight_decay=1e-5, schedule="constant"),
    augment=False, oversample_foreground=0.5, grad_clip=None)
MONAI_SWIN_SOURCE = ("MONAI's Swin-UNETR BTCV tutorial: AdamW 1e-4, weight decay 1e-5, no "
                     "schedule, half the patches on foreground, no clipping; its light "
                     "flips/rotations/intensity shifts not available, so no augmentation; "
                     "from scratch (no self-supervised weights)")


# --------------------------------------------------------------------------- unet


class UNetOptions(ModelOptions):
    channels: tuple[int, ...] = (32, 64, 128, 256, 320)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("strides")
    @classmethod
    def _one_stride_per_level(cls, strides, info):
        channels = info.data.get("channels", ())
        if channels and len(strides) != len(channels) - 1:
            raise ValueError("needs one stride fewer than channels")
        return strides


def build_unet(shape: NetworkShape, options: UNetOptions) -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=shape.in_channels,
        out_channels=shape.out_channels,
        channels=options.channels,
        strides=options.strides,
        num_res_units=options.num_res_units,
        norm="instance",
        dropout=options.dropout,
    )


def unet_divisor(shape: NetworkShape, options: UNetOptions) -> tuple[int, int, int]:
    return (math.prod(options.strides),) * 3


# --------------------------------------------------------------------------- swin_unetr


class SwinUNETROptions(ModelOptions):
    feature_size: int = Field(24, gt=0, multiple_of=12)  # SwinUNETR needs a multiple of 12
    use_v2: bool = True  # residual conv blocks at each stage (Swin-UNETR v2)
    use_checkpoint: bool = False  # gradient checkpointing: less memory, ~30% slower
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


def build_swin_unetr(shape: NetworkShape, options: SwinUNETROptions) -> SwinUNETR:
    return SwinUNETR(
        in_channels=shape.in_channels,
        out_channels=shape.out_channels,
        feature_size=options.feature_size,
        use_v2=options.use_v2,
        use_checkpoint=options.use_checkpoint,
        depths=options.depths,
        num_heads=options.num_heads,
        drop_rate=options.drop_rate,
        spatial_dims=3,
    )


def swin_divisor(shape: NetworkShape, options: SwinUNETROptions) -> tuple[int, int, int]:
    return (32, 32, 32)  # patch embedding (2) x four patch-merging stages (2**4)


# --------------------------------------------------------------------------- nnunet


class NNUNetOptions(ModelOptions):
    deep_supervision: bool = True
    # None: the plans' features (32 doubling to 320); a list overrides them per stage, as
    # nnU-Net users edit plans.json for a smaller or larger net (e.g. for a CPU demo)
    features_per_stage: tuple[int, ...] | None = None


def nnunet_topology(shape: NetworkShape) -> tuple[list, list, list[int]]:
    """Kernel sizes, strides and features from the plans, with a clear error if absent."""
    architecture = shape.architecture
    if architecture is None:
        raise MedpipeError("model 'nnunet' is configured from plans.json: the configuration's "
                           "architecture.arch_kwargs is missing")
    kernels = [list(k) for k in architecture.kernel_sizes]
    strides = [list(s) for s in architecture.strides]
    features = list(architecture.features_per_stage)
    if not len(kernels) == len(strides) == len(features):
        raise MedpipeError("plans.json: kernel_sizes, strides and features differ in length")
    return kernels, strides, features


def deep_supervision_heads(n_stages: int) -> int:
    """Extra outputs below full resolution, as nnU-Net weights them.

    nnU-Net supervises every decoder level but gives the lowest one weight 0, so
    n_stages - 3 extra heads (plus the full-resolution output) carry all its weight.
    """
    return max(0, n_stages - 3)


class NNUNetDynUNet(DynUNet):
    """DynUNet whose deep-supervision outputs keep their own resolution in training (a list,
    full size first), as nnU-Net scores each against labels resized to it; MONAI's DynUNet
    upsamples them to full size and stacks them, which scores interpolated logits against
    full-size labels instead. The same modules and weights; eval mode returns one tensor."""

    def forward(self, x: torch.Tensor):
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out, *self.heads]
        return out


def build_nnunet(shape: NetworkShape, options: NNUNetOptions) -> DynUNet:
    kernels, strides, features = nnunet_topology(shape)
    features = _features(options, features)
    heads = deep_supervision_heads(len(strides)) if options.deep_supervision else 0
    return NNUNetDynUNet(
        spatial_dims=3,
        in_channels=shape.in_channels,
        out_channels=shape.out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=features,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=heads > 0,
        deep_supr_num=max(1, heads),
        res_block=False,
    )


def build_nnunet_resenc(shape: NetworkShape, options: NNUNetOptions) -> nn.Module:
    from medpipe.models.resenc import residual_encoder_unet

    kernels, strides, features = nnunet_topology(shape)
    architecture = shape.architecture
    if not architecture.residual:
        raise MedpipeError("model 'nnunet_resenc' needs plans from a Residual Encoder planner "
                           "(planner: ResEncM, ResEncL or ResEncXL; `medpipe plan --planner`)")
    features = _features(options, features)
    return residual_encoder_unet(
        shape.in_channels, shape.out_channels, kernels, strides, features,
        architecture.n_blocks_per_stage, architecture.n_conv_per_stage_decoder,
        options.deep_supervision)


def _features(options: NNUNetOptions, planned: list[int]) -> list[int]:
    """The plans' features per stage, or the option that overrides them (one per stage)."""
    if options.features_per_stage is None:
        return planned
    if len(options.features_per_stage) != len(planned):
        raise MedpipeError(
            f"option features_per_stage needs {len(planned)} values, one per stage of the "
            f"plans, got {len(options.features_per_stage)}")
    return list(options.features_per_stage)


def nnunet_divisor(shape: NetworkShape, options: NNUNetOptions) -> Sequence[int]:
    _, strides, _ = nnunet_topology(shape)
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))


register(
    ModelSpec(
        name="unet",
        task="segmentation",
        options=UNetOptions,
        build=build_unet,
        patch_divisor=unet_divisor,
        optimizer_defaults=ADAMW_COSINE,
        recipe=MONAI_UNET_RECIPE,
        recipe_source=MONAI_UNET_SOURCE,
        description="MONAI UNet, residual units, instance norm",
    )
)
register(
    ModelSpec(
        name="swin_unetr",
        task="segmentation",
        options=SwinUNETROptions,
        build=build_swin_unetr,
        patch_divisor=swin_divisor,
        # Hatamizadeh et al. / MONAI tutorial
        optimizer_defaults=ADAMW_COSINE.overridden_by(OptimizerConfig(lr=1e-4)),
        recipe=MONAI_SWIN_RECIPE,
        recipe_source=MONAI_SWIN_SOURCE,
        description="MONAI SwinUNETR (v2 blocks by default)",
        # at 32 voxels the bottleneck is 1 voxel wide and instance norm cannot train on it
        min_patch_size=64,
    )
)
register(
    ModelSpec(
        name="nnunet",
        task="segmentation",
        options=NNUNetOptions,
        build=build_nnunet,
        patch_divisor=nnunet_divisor,
        optimizer_defaults=NNUNET_SGD,
        recipe=NNUNET_RECIPE,
        recipe_source=NNUNET_SOURCE,
        description="MONAI DynUNet configured from plans.json (nnU-Net's PlainConvUNet)",
    )
)
register(
    ModelSpec(
        name="nnunet_resenc",
        task="segmentation",
        options=NNUNetOptions,
        build=build_nnunet_resenc,
        patch_divisor=nnunet_divisor,
        optimizer_defaults=NNUNET_SGD,
        recipe=NNUNET_RECIPE,
        recipe_source=NNUNET_SOURCE,
        needs_residual_plans=True,
        description="nnU-Net's ResidualEncoderUNet from ResEnc plans "
                    "(dynamic-network-architectures)",
    )
)
