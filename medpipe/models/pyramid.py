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

Optionally (`global_stage: affine`) a learned affine stage comes first (`AffineStage`: a
weighted least-squares fit of displacements predicted on the coarsest correlation), the map
being x -> A(x + u(x)), the affine left out of the smoothness penalty; off by default, as it
measured no better (see `PyramidOptions.global_stage`).

Forward: `net(moving, fixed) -> (warped moving, ddf)`; `net(moving, fixed, parts=True)` adds
the affine stage's share of the ddf (None without one), which the penalty leaves out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from medpipe.models.registry import ModelSpec, NetworkShape, RegistrationOptions, register
from medpipe.spatial import compose, full_precision, integrate, upsample_field, warp
from medpipe.training_settings import OptimizerConfig

# Adam at 1e-3 with a cosine decay, as theirs (Adam/amsgrad, cosine restarts 1e-3 -> 1e-5)
ADAM = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine")


class PyramidOptions(RegistrationOptions):
    encoder_channels: tuple[int, ...] = (8, 16, 32, 32)  # per level, finest first
    decoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    radius: int = Field(1, ge=1, le=3)  # correlation neighbourhood: (2 r + 1)^3 offsets
    integration_steps: int = Field(7, ge=0)  # per level; 0: residuals are displacements
    inverse_consistency: float = Field(0.1, ge=0)  # on by default: part of the method
    # affine: a global stage before the deformable levels (`AffineStage`), left out of
    # the smoothness penalty; none: the levels alone. Not the default: on the study's 20
    # test pairs (9 subjects, 80 pairs) it scored 0.719-0.723 against 0.725 without it
    # (0.740 at ten times the step, which rotated a single test pair's map by 90 degrees)
    global_stage: Literal["affine", "none"] = "none"

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
    """Correlation -> a residual field (3 channels; OUTPUTS for another use), starting near
    zero."""

    def __init__(self, in_channels: int, channels: int, outputs: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv3d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
        )
        self.field = nn.Conv3d(channels, outputs, 3, 1, 1, bias=False)
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


def level_points(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(X Y Z, 4) homogeneous voxel centres of a grid of SHAPE in coordinates every level of
    the pyramid shares: (2 i + 1) / n - 1 along each axis, the grid's outer edges at -1 and
    1 (the region `upsample_field` keeps). A displacement of d there is d n / 2 voxels."""
    axes = [(2 * torch.arange(n, device=device, dtype=torch.float32) + 1) / n - 1
            for n in shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([points, torch.ones_like(points[:, :1])], dim=1)


class AffineStage(nn.Module):
    """A global affine map from the coarsest features, fitted, not regressed: a decoder on
    their local correlation predicts a displacement and a confidence per coarse voxel, and
    the affine is the confidence-weighted least-squares fit of those displacements (a
    closed form, differentiable; KeyMorph, Yu et al. 2022, fits its affine to matched
    keypoints the same way). A fit keeps where each displacement was, which a regression
    from pooled features loses, and starts at the identity (the decoder starts near zero,
    the confidences equal).

    Why a separate stage: trained on centres-of-mass-aligned pairs, the deformable levels
    left the global misalignment partly unrecovered (demo, 3 unseen pairs at 3 mm: 0.720 by
    forward passes, 0.781 after an iterative SimpleITK affine), and the diffusion penalty
    charges every voxel for a global scaling or rotation. The affine is exempt from it.
    Measured, it did not close that gap (`options.global_stage`, off by default).
    """

    RIDGE = 1e-4  # pulls an ill-posed fit (confidence on a plane) towards the identity
    # coarse voxels per unit of decoder output: one Adam step on the decoder moves every
    # voxel's displacement together, and the fit turns that into a global move; unscaled,
    # the first steps on a single pair rotated the map by 90 degrees and never came back
    STEP = 0.1

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.decoder = FieldDecoder(in_channels, channels, outputs=4)

    def forward(self, correlation: torch.Tensor) -> torch.Tensor:
        """(B, 4, 3) matrices M in `level_points` coordinates: a point p maps to p_h M."""
        out = self.decoder(correlation)
        with full_precision(out):
            out = out.float()
            shape = tuple(out.shape[2:])
            size = torch.tensor(shape, device=out.device, dtype=torch.float32)
            points = level_points(shape, out.device)  # (N, 4)
            displacement = out[:, :3].flatten(2).transpose(1, 2) * self.STEP
            targets = points[:, :3] + displacement * 2 / size
            # half the weight spread evenly: the fit stays posed however the confidences
            # concentrate (a softmax alone can hand the fit to a few voxels on a plane)
            weights = 0.5 * (torch.softmax(out[:, 3].flatten(1), dim=1) + 1 / out[0, 3].numel())
            weights = weights[..., None]  # (B, N, 1)
            normal = points.T @ (weights * points)  # (B, 4, 4)
            identity = torch.eye(4, 3, device=out.device)
            ridge = self.RIDGE * torch.eye(4, device=out.device)
            return solve_small_spd(normal + ridge,
                                   points.T @ (weights * targets) + self.RIDGE * identity)


def solve_small_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with A X = B for small symmetric positive-definite A (B, n, n) and B (B, n, m), by
    a Cholesky factorisation unrolled into elementwise operations: `torch.linalg.solve`
    has no ONNX operator, and this keeps the network exportable (`medpipe export`)."""
    n = a.shape[-1]
    lower: list[list[torch.Tensor]] = [[] for _ in range(n)]  # lower[i][j]: (B,)
    for j in range(n):
        pivot = (a[:, j, j] - sum(lower[j][k] ** 2 for k in range(j))).sqrt()
        lower[j].append(pivot)
        for i in range(j + 1, n):
            lower[i].append((a[:, i, j] - sum(lower[i][k] * lower[j][k] for k in range(j)))
                            / pivot)
    forward: list[torch.Tensor] = []  # L y = b, rows (B, m)
    for i in range(n):
        forward.append((b[:, i] - sum(lower[i][k][:, None] * forward[k] for k in range(i)))
                       / lower[i][i][:, None])
    solution: list[torch.Tensor] = [forward[0]] * n  # L^T x = y
    for i in reversed(range(n)):
        solution[i] = (forward[i] - sum(lower[k][i][:, None] * solution[k]
                                        for k in range(i + 1, n))) / lower[i][i][:, None]
    return torch.stack(solution, dim=1)


def affine_displacement(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, *SHAPE) voxel displacements of the affine MATRIX (`AffineStage`) on a level
    of SHAPE, in float32."""
    with full_precision(matrix):
        points = level_points(shape, matrix.device)
        moved = points @ matrix.float()  # (B, N, 3)
        size = torch.tensor(shape, device=matrix.device, dtype=torch.float32)
        voxels = (moved - points[:, :3]) * size / 2
        return voxels.transpose(1, 2).reshape(len(matrix), 3, *shape)


def affine_linear(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, 3) linear part of MATRIX acting on voxel displacements of a level of SHAPE
    (row vectors: a displacement d becomes d L)."""
    size = torch.tensor(shape, device=matrix.device, dtype=torch.float32)
    return matrix[:, :3].float() * (2 / size)[:, None] * (size / 2)[None, :]


def after_affine(deformable: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """The displacement of x -> A(x + u(x)): the deformable field u, then the affine A
    (None: u itself), on u's grid. Exact, no resampling: A(x + u) - x = (A x - x) + L u."""
    if matrix is None:
        return deformable
    with full_precision(deformable):
        shape = tuple(deformable.shape[2:])
        mixed = torch.einsum("bc...,bcd->bd...", deformable.float(),
                             affine_linear(matrix, shape))
        return affine_displacement(matrix, shape) + mixed


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
        self.affine = (AffineStage(offsets, options.decoder_channels[-1])
                       if options.global_stage == "affine" else None)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        pyramid, x = [], image
        for level in self.encoder:
            x = level(x)
            pyramid.append(x)
        return pyramid

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                parts: bool = False) -> tuple[torch.Tensor, ...]:
        """(warped moving, ddf), and with PARTS the global stage's share of the ddf (None
        without one): what the smoothness penalty leaves out."""
        both = self.features(torch.cat([moving, fixed]))  # one pass, shared weights
        n = len(moving)
        matrix = None
        if self.affine is not None:
            coarsest = both[-1]
            matrix = self.affine(local_correlation(coarsest[n:], coarsest[:n], self.radius))
        deformable = None  # u: the map is x -> A(x + u(x))
        for level in reversed(range(len(both))):
            moving_features, fixed_features = both[level][:n], both[level][n:]
            shape = tuple(fixed_features.shape[2:])
            if deformable is not None:
                deformable = upsample_field(deformable, shape)
            if deformable is not None or matrix is not None:
                so_far = (after_affine(deformable, matrix) if deformable is not None
                          else affine_displacement(matrix, shape))
                moving_features = warp(moving_features, so_far, padding_mode="border")
            correlation = local_correlation(fixed_features, moving_features.to(
                fixed_features.dtype), self.radius)
            residual = self.decoders[level](correlation)
            if self.integration_steps:
                residual = integrate(residual, self.integration_steps)
            deformable = (residual.float() if deformable is None
                          else compose(residual, deformable))
        ddf = after_affine(deformable, matrix)
        warped = warp(moving, ddf)
        if not parts:
            return warped, ddf
        shape = tuple(ddf.shape[2:])
        return warped, ddf, None if matrix is None else affine_displacement(matrix, shape)


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
