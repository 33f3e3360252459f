"""`nnunet_resenc`: nnU-Net's Residual Encoder U-Net, built by nnU-Net's own network package.

nnU-Net v2 builds its networks from plans with `dynamic-network-architectures`
(`architecture.network_class_name` + `arch_kwargs`); so does this module, with the kwargs
nnU-Net's ResEnc planners write (conv bias, instance norm with eps 1e-5 and affine, leaky
ReLU, no dropout) and nnU-Net's initialisation (He with a = 1e-2, the last norm of every
residual branch zeroed). The package is installed without its dependencies: its `timm` pin
pulls in torchvision, whose PyPI builds replace the CPU torch with a CUDA one, and the U-Net
classes import only torch and numpy.

Two differences from nnU-Net's use, neither changing the training: the decoder returns its
deep-supervision outputs only in training mode (nnU-Net switches `decoder.deep_supervision`
off by hand before predicting), so that evaluation, inference and export see one output, as
for every other model; and the lowest output, which nnU-Net's loss weights 0, is not
returned, so that every nnU-Net-style model hands the loss the outputs it scores (its head,
never trained, is frozen, so that DDP takes its steps).
"""

from __future__ import annotations

import torch
from torch import nn

from medpipe.errors import MedpipeError

try:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
except ImportError:  # an optional part: only this model needs it
    ResidualEncoderUNet = None

INSTALL_HINT = ("pip install --no-deps dynamic-network-architectures==0.4.4 (no deps: its "
                "timm pin would replace torch; `make setup` does this)")


def residual_encoder_unet(in_channels: int, out_channels: int, kernel_sizes, strides,
                          features, blocks_per_stage, convs_per_decoder_stage,
                          deep_supervision: bool) -> nn.Module:
    """nnU-Net's ResidualEncoderUNet for these per-stage settings, initialised as nnU-Net
    initialises it."""
    if ResidualEncoderUNet is None:
        raise MedpipeError(f"model 'nnunet_resenc' needs dynamic-network-architectures: "
                           f"{INSTALL_HINT}")
    network = _TrainingOnlyDeepSupervision(
        input_channels=in_channels, n_stages=len(strides), features_per_stage=list(features),
        conv_op=nn.Conv3d, kernel_sizes=[list(k) for k in kernel_sizes],
        strides=[list(s) for s in strides], n_blocks_per_stage=list(blocks_per_stage),
        num_classes=out_channels, n_conv_per_stage_decoder=list(convs_per_decoder_stage),
        conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
    network.apply(network.initialize)
    # heads whose outputs no loss sees (the lowest deep-supervision head; without deep
    # supervision, all but the full-size one) never get a gradient, which DDP refuses at
    # the second step: frozen, they are left out of it and of the optimiser's updates
    heads = network.decoder.seg_layers
    for head in heads[:1] if deep_supervision else heads[:-1]:
        head.requires_grad_(False)
    return network


if ResidualEncoderUNet is not None:

    class _TrainingOnlyDeepSupervision(ResidualEncoderUNet):
        """ResidualEncoderUNet whose deep-supervision outputs (a list, full size first, the
        lowest left out) come only in training mode; in eval mode one tensor."""

        def __init__(self, *args, deep_supervision: bool, **kwargs) -> None:
            super().__init__(*args, deep_supervision=deep_supervision, **kwargs)
            self.supervise_deep = deep_supervision

        def forward(self, x: torch.Tensor):
            self.decoder.deep_supervision = self.supervise_deep and self.training
            output = super().forward(x)
            return output[:-1] if isinstance(output, list) and len(output) > 1 else output
