"""U-Net topology from spacing and patch size, by nnU-Net v2's rules.

`pool_and_conv_props` follows nnU-Net's `get_pool_and_conv_props`: pool an axis while its
feature map stays >= 2 x 4 voxels and its spacing is within a factor 2 of the finest axis;
a conv kernel is 3 along an axis once that axis is within a factor 2 of the finest spacing,
1 before (so anisotropic data starts with 1x3x3 kernels). `feature_map_voxels` and
`resenc_feature_map_voxels` count the activations of nnU-Net's PlainConvUNet and
ResidualEncoderUNet exactly as their `compute_conv_feature_map_size` does (the tests compare
with `dynamic-network-architectures` itself), which is what the planner compares with its
memory budget. Written here from the published rules so that planning needs neither nnU-Net
nor a network instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_FEATURE_MAP_EDGE = 4  # nnU-Net: UNet_featuremap_min_edge_length
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
CONVS_PER_STAGE = 2
# nnU-Net's ResEnc presets (ResEncUNetPlanner): residual blocks per encoder stage, one conv
# per decoder stage
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_CONVS_PER_DECODER_STAGE = 1


@dataclass(frozen=True)
class Topology:
    patch_size: tuple[int, ...]
    pool_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]  # first stage has stride 1
    kernel_sizes: tuple[tuple[int, ...], ...]
    divisible_by: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def features_per_stage(self) -> tuple[int, ...]:
        return tuple(min(MAX_FEATURES_3D, BASE_FEATURES * 2**i) for i in range(self.n_stages))


def pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[float]) -> Topology:
    """Strides and kernels for a patch; the patch is padded up to a multiple of 2**pools."""
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * MIN_FEATURE_MAP_EDGE]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * MIN_FEATURE_MAP_EDGE:
            break
        if not valid:
            break
        for axis in range(dim):
            if kernel[axis] != 3 and current_spacing[axis] / min(current_spacing) < 2:
                kernel[axis] = 3
        stride = [1] * dim
        for axis in valid:
            stride[axis] = 2
            pools[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = np.ceil(current_size[axis] / 2)
        strides.append(tuple(stride))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)  # the bottleneck always uses 3x3x3
    divisible_by = tuple(2**p for p in pools)
    return Topology(
        patch_size=_pad_to_multiple(patch_size, divisible_by),
        pool_per_axis=tuple(pools),
        strides=tuple(strides),
        kernel_sizes=tuple(kernels),
        divisible_by=divisible_by,
    )


def feature_map_voxels(topology: Topology, n_classes: int) -> int:
    """Activations of a PlainConvUNet (2 convs per stage, no deep supervision) for one patch."""
    features = topology.features_per_stage
    size = list(topology.patch_size)
    total = 0
    skip_sizes = []
    for stage, stride in enumerate(topology.strides):
        size = [s // st for s, st in zip(size, stride, strict=True)]
        total += CONVS_PER_STAGE * features[stage] * int(np.prod(size, dtype=np.int64))
        skip_sizes.append(size)
    # decoder: from the deepest skip up; each stage: transposed conv, 2 convs, and the
    # segmentation head on the last stage only
    for depth in range(topology.n_stages - 1):
        skip = skip_sizes[-(depth + 2)]
        voxels = int(np.prod(skip, dtype=np.int64))
        out_features = features[-(depth + 2)]
        total += CONVS_PER_STAGE * out_features * voxels + out_features * voxels
        if depth == topology.n_stages - 2:
            total += n_classes * voxels
    return total


def resenc_feature_map_voxels(topology: Topology, n_classes: int) -> int:
    """Activations of a ResidualEncoderUNet (nnU-Net's ResEnc presets: basic residual blocks,
    `RESENC_BLOCKS_PER_STAGE`, one conv per decoder stage, no deep supervision) for one
    patch: the stem's conv at full size; per stage, two convs per block at the stage's
    size, plus the first block's 1x1 projection where it strides or changes the width; the
    decoder as the plain U-Net's with one conv per stage."""
    features = topology.features_per_stage
    size = list(topology.patch_size)
    total = features[0] * int(np.prod(size, dtype=np.int64))  # the stem
    skip_sizes = []
    width = features[0]
    for stage, stride in enumerate(topology.strides):
        after = [s // st for s, st in zip(size, stride, strict=True)]
        voxels = features[stage] * int(np.prod(after, dtype=np.int64))
        total += 2 * voxels * RESENC_BLOCKS_PER_STAGE[stage]
        if width != features[stage] or after != size:
            total += voxels  # the first block's projection of its input
        size, width = after, features[stage]
        skip_sizes.append(size)
    for depth in range(topology.n_stages - 1):
        skip = skip_sizes[-(depth + 2)]
        voxels = features[-(depth + 2)] * int(np.prod(skip, dtype=np.int64))
        total += RESENC_CONVS_PER_DECODER_STAGE * voxels + voxels  # convs, transposed conv
        if depth == topology.n_stages - 2:
            total += n_classes * int(np.prod(skip, dtype=np.int64))
    return total


def _pad_to_multiple(shape: Sequence[float], divisible_by: Sequence[int]) -> tuple[int, ...]:
    """Round up to a multiple; sizes may be fractional (a median shape), as in nnU-Net."""
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisible_by, strict=True))
