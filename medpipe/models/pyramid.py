"""A coarse-to-fine registration network: a shared feature pyramid, local correlation at each
level, residual fields composed from the coarsest level to the data's grid.

The design is the dual-stream pyramid of Liu et al. ("Unsupervised deep learning deformable
image registration revisited", MIDL 2025; code `HengjieLiu/Unsupervised-DL-DIR-Revisited`,
its DP-Conv-C model), which they found makes the amount of training data nearly irrelevant
(LUMIR validation Dice 0.764 from 10 subjects, 0.772 from 3,384):

- one encoder (siamese: the same weights) turns each image into features at 1, 1/2, 1/4,
  1/8 of the grid; a level is two 3^3 convolutions with instance norm and leaky ReLU and a
  1x1 residual path, the first convolution strided on the way down (their
  `conv_block_standard_stride_down_with_skip`);
- from the coarsest level up, the moving image's features are warped by the field so far,
  correlated with the fixed image's over a 3^3 neighbourhood (27 dot products scaled by
  C^-1/2, their `WinCorrTorch`; the decoder sees only the correlation, their "C" variant),
  and a small decoder predicts a residual field, composed with the field so far
  (u <- r + u o (id + r), their `ComposeDVF`), not added: the residual moves the already
  warped image, so it acts first;
- each decoder's last convolution starts at N(0, 1e-5) with no bias, so training starts at
  the identity, as theirs and RDP's do;
- with `integration_steps` > 0 each residual is a stationary velocity integrated by scaling
  and squaring (as RDP, Wang et al. 2024, integrates every level's residual), so the whole
  map is a composition of diffeomorphisms.

Inverse consistency is a loss term here (`inverse_consistency`: register A->B and B->A in
one batch and penalise |u_AB + u_BA o (id + u_AB)|^2, `registration.loss`), not SITReg's
architecture (their DP-ConvIC): SITReg's fixed-point inversions at every level cost too
much on a CPU, and their own table puts DP-Conv-C's Dice level with it.

Widths are a CPU's, not theirs (encoder 16-32-32-64-64, decoder 32-64-64-128-128 at 1 mm):
the default 8-16-32-32 / 16-32-32-32 at four levels trains at about a step per second at
the demo's 3 mm grid on two cores. The transform part (warps, integration, composition,
upsampling) runs in float32 under any autocast (`medpipe.spatial`).

Forward: `net(moving, fixed) -> (warped moving, ddf)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from medpipe.config import OptimizerConfig
from medpipe.models.registry import ModelSpec, NetworkShape, RegistrationOptions, register
from medpipe.spatial import compose, integrate, upsample_field, warp

# Adam at 1e-3 with a cosine decay, as theirs (Adam/amsgrad, cosine restarts 1e-3 -> 1e-5)
ADAM = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine")


class PyramidOptions(RegistrationOptions):
    encoder_channels: tuple[int, ...] = (8, 16, 32, 32)  # per level, finest first
    decoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    radius: int = Field(1, ge=1, le=3)  # correlation neighbourhood: (2 r + 1)^3 offsets
    integration_steps: int = Field(7, ge=0)  # per level; 0: residuals are displacements
    inverse_consistency: float = Field(0.1, ge=0)  # on by default: part of the method

    @model_validator(mode="after")
    def _levels_match(self) -> PyramidOptions:
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("encoder_channels and decoder_channels need one entry per level")
        if len(self.encoder_channels) < 3:
            raise ValueError("a pyramid needs at least three levels")
        return self


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.first = nn.Conv3d(in_channels, out_channels, 3, stride, 1)
        self.second = nn.Conv3d(out_channels, out_channels, 3, 1, 1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.skip = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride),
                                  nn.InstanceNorm3d(out_channels, affine=True))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.first(x)))
        return self.act(self.norm2(self.second(y)) + self.skip(x))


class FieldDecoder(nn.Module):
    """Correlation -> a residual field (3 channels), starting near zero."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv3d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
        )
        self.field = nn.Conv3d(channels, 3, 3, 1, 1, bias=False)
        nn.init.normal_(self.field.weight, 0.0, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(self.body(x))


def local_correlation(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, (2R+1)^3, X, Y, Z): per voxel x and offset d, <fixed(x), moving(x + d)> / sqrt(C),
    zero beyond the grid."""
    scale = fixed.shape[1] ** -0.5
    padded = F.pad(moving, (radius,) * 6)
    size = fixed.shape[2:]
    span = range(2 * radius + 1)
    return torch.cat([
        (fixed * padded[:, :, i:i + size[0], j:j + size[1], k:k + size[2]]).sum(
            1, keepdim=True) * scale
        for i in span for j in span for k in span
    ], dim=1)


class PyramidRegistration(nn.Module):
    def __init__(self, in_channels: int, options: PyramidOptions) -> None:
        super().__init__()
        channels = options.encoder_channels
        self.radius = options.radius
        self.integration_steps = options.integration_steps
        self.encoder = nn.ModuleList(
            EncoderLevel(c_in, c_out, 1 if level == 0 else 2)
            for level, (c_in, c_out) in enumerate(zip((in_channels, *channels[:-1]), channels,
                                                         strict=True))
        )
        offsets = (2 * options.radius + 1) ** 3
        self.decoders = nn.ModuleList(FieldDecoder(offsets, c)
                                      for c in options.decoder_channels)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        pyramid, x = [], image
        for level in self.encoder:
            x = level(x)
            pyramid.append(x)
        return pyramid

    def forward(self, moving: torch.Tensor,
                fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.features(torch.cat([moving, fixed]))  # one pass, shared weights
        n = len(moving)
        ddf = None
        for level in reversed(range(len(both))):
            moving_features, fixed_features = both[level][:n], both[level][n:]
            if ddf is not None:
                ddf = upsample_field(ddf, tuple(fixed_features.shape[2:]))
                moving_features = warp(moving_features, ddf, padding_mode="border")
            correlation = local_correlation(fixed_features, moving_features.to(
                fixed_features.dtype), self.radius)
            residual = self.decoders[level](correlation)
            if self.integration_steps:
                residual = integrate(residual, self.integration_steps)
            ddf = residual.float() if ddf is None else compose(residual, ddf)
        return warp(moving, ddf), ddf


def build_pyramid(shape: NetworkShape, options: PyramidOptions) -> PyramidRegistration:
    return PyramidRegistration(shape.in_channels, options)


def pyramid_divisor(shape: NetworkShape, options: PyramidOptions) -> tuple[int, int, int]:
    return (2 ** (len(options.encoder_channels) - 1),) * 3


register(
    ModelSpec(
        name="pyramid",
        task="registration",
        options=PyramidOptions,
        build=build_pyramid,
        patch_divisor=pyramid_divisor,
        optimizer_defaults=ADAM,
        description="coarse-to-fine pyramid with local correlation and inverse consistency "
                    "(Liu et al., MIDL 2025)",
    )
)
