"""Experiment plans by nnU-Net v2's default planner (`ExperimentPlanner`), with reasons
(the `Plans` it returns are defined in `planning.plans`).

The rules, as nnU-Net v2 applies them:

- target spacing: the median spacing; if one axis is > 3x coarser than the others *and*
  has > 3x fewer voxels, that axis takes the 10th percentile of its spacings instead (never
  finer than the other axes);
- normalisation: `CTNormalization` for channels named "CT", otherwise `ZScoreNormalization`,
  restricted to the non-zero mask when cropping shrank the median case below 3/4;
- patch size: start from a 256^3-voxel box shaped like 1/spacing, clipped to the median
  shape; shrink the axis largest relative to the median shape until the network's feature
  maps fit a memory budget (560e6 activations at 8 GB, scaled by `gpu_memory_gb`);
- batch size: whatever the budget leaves, at least 2, at most 5% of the dataset's voxels;
- topology: see `medpipe.planning.topology`;
- `3d_lowres`: only when a fullres patch covers < 25% of the median image.

Presets (`PLANNERS`), as nnU-Net v2's `-pl`: `default` (`ExperimentPlanner`, a PlainConvUNet)
and the Residual Encoder presets of "nnU-Net Revisited" (`nnUNetPlannerResEncM/L/XL`): a
ResidualEncoderUNet (blocks per stage 1, 3, 4, 6, 6, 6, ..., one conv per decoder stage),
memory targets 8 / 24 / 40 GB against reference activations 680M / 2100M / 3600M, and no 5%
cap on the batch (a batch may cover the whole dataset).

nnU-Net plans on SimpleITK arrays (z, y, x) transposed so the coarsest axis comes first.
To reproduce its tie-breaking exactly we plan in that order and report results in
medpipe's (i, j, k) array order. Field names follow nnU-Net's plans.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medpipe.planning.plans import Plans, parse_plans
from medpipe.planning.topology import (
    CONVS_PER_STAGE,
    RESENC_BLOCKS_PER_STAGE,
    RESENC_CONVS_PER_DECODER_STAGE,
    Topology,
    feature_map_voxels,
    pool_and_conv_props,
    resenc_feature_map_voxels,
)

ANISOTROPY_THRESHOLD = 3.0
REFERENCE_BATCH_SIZE = 2
MIN_BATCH_SIZE = 2
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PlannerName = Literal["default", "ResEncM", "ResEncL", "ResEncXL"]


@dataclass(frozen=True)
class Planner:
    """One of nnU-Net v2's planners: the network it sizes, and its memory reference (the
    activations that fit REFERENCE_GB at batch size 2)."""

    plans_name: str
    network_class_name: str
    estimate: Callable[[Topology, int], int]
    reference_activations: float
    reference_gb: float
    max_dataset_fraction_per_batch: float

    @property
    def residual(self) -> bool:
        return self.network_class_name == RESENC_UNET


PLANNERS: dict[str, Planner] = {
    "default": Planner("medpipePlans", PLAIN_UNET, feature_map_voxels, 560e6, 8.0, 0.05),
    "ResEncM": Planner("medpipeResEncUNetMPlans", RESENC_UNET, resenc_feature_map_voxels,
                       680e6, 8.0, 1.0),
    "ResEncL": Planner("medpipeResEncUNetLPlans", RESENC_UNET, resenc_feature_map_voxels,
                       2100e6, 24.0, 1.0),
    "ResEncXL": Planner("medpipeResEncUNetXLPlans", RESENC_UNET, resenc_feature_map_voxels,
                        3600e6, 40.0, 1.0),
}
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
NORMALISATION_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
}


def plan_experiment(fingerprint: dict, gpu_memory_gb: float | None = None,
                    planner: PlannerName = "default") -> Plans:
    """plans.json content for a fingerprint by PLANNER (`PLANNERS`) for GPU_MEMORY_GB (None:
    the planner's own target): `3d_fullres`, and `3d_lowres` where useful."""
    preset = PLANNERS[planner]
    gpu_memory_gb = preset.reference_gb if gpu_memory_gb is None else gpu_memory_gb
    spec = fingerprint["dataset_json"]
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]], dtype=float)
    shapes = np.array([c["shape_after_crop"] for c in fingerprint["cases"]], dtype=float)
    n_training = len(fingerprint["cases"])
    n_classes = len(spec["labels"])
    reasons: dict[str, str] = {}

    target, reasons["spacing"] = fullres_target_spacing(spacings[:, ::-1], shapes[:, ::-1])
    target = target[::-1]  # back to (i, j, k)
    # nnU-Net's working order: reversed (SimpleITK's z, y, x), coarsest axis first
    reversed_axes = [2, 1, 0]
    coarsest = int(np.argmax(target[reversed_axes]))
    working = [reversed_axes[coarsest]] + [a for i, a in enumerate(reversed_axes) if i != coarsest]
    back = [working.index(a) for a in range(3)]

    new_shapes = np.array(
        [
            [round(s / t * n) for n, s, t in zip(shape, sp, target, strict=True)]
            for shape, sp in zip(shapes, spacings, strict=True)
        ]
    )
    median_shape = np.median(new_shapes, axis=0)
    n_voxels_dataset = float(np.prod(median_shape, dtype=np.float64) * n_training)
    budget = preset.reference_activations * gpu_memory_gb / preset.reference_gb

    schemes, use_mask, reasons["normalization_schemes"] = normalisation_schemes(
        spec["channel_names"], fingerprint["median_relative_size_after_cropping"]
    )
    fullres = _configuration(
        target[working], median_shape[working], n_voxels_dataset, n_classes, budget, preset
    )
    configurations = {"3d_fullres": fullres}

    lowres = _lowres_configuration(fullres, median_shape[working], n_training, n_classes, budget,
                                   preset)
    if lowres is not None:
        configurations = {"3d_lowres": lowres, "3d_fullres": fullres}

    for name, config in configurations.items():
        # as nnU-Net's ResEnc planners: 3d_fullres shares the default plans' preprocessed
        # data (the same spacing and normalisation), other configurations do not
        shared = name == "3d_fullres" or planner == "default"
        config["data_identifier"] = f"{'medpipePlans' if shared else preset.plans_name}_{name}"
        config["normalization_schemes"] = schemes
        config["use_mask_for_norm"] = use_mask
        config["batch_dice"] = lowres is not None and name == "3d_fullres"
        _to_array_order(config, back)
        config["reasons"] = {
            "spacing": reasons["spacing"] if name == "3d_fullres" else config["reasons"]["spacing"],
            "normalization_schemes": reasons["normalization_schemes"],
            **{k: v for k, v in config["reasons"].items() if k != "spacing"},
        }

    return parse_plans({
        "dataset_name": spec.get("name") or "dataset",
        "plans_name": preset.plans_name,
        "axes": "medpipe array axes (i, j, k); nnU-Net lists the same values reversed",
        "original_median_spacing": np.median(spacings, axis=0).tolist(),
        "original_median_shape": [round(v) for v in np.median(shapes, axis=0)],
        "configurations": configurations,
        "foreground_intensity_properties_per_channel": fingerprint[
            "foreground_intensity_properties_per_channel"
        ],
        "labels": spec["labels"],
        "regions_class_order": spec.get("regions_class_order"),
        "channel_names": spec["channel_names"],
        "gpu_memory_target_gb": gpu_memory_gb,
        "data_hash": fingerprint.get("data_hash"),
        "experiment_planner_used": f"medpipe (nnU-Net v2 {_NNUNET_NAMES[planner]} rules)",
    })


_NNUNET_NAMES = {"default": "ExperimentPlanner", "ResEncM": "nnUNetPlannerResEncM",
                 "ResEncL": "nnUNetPlannerResEncL", "ResEncXL": "nnUNetPlannerResEncXL"}


def fullres_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, str]:
    """Median spacing, with nnU-Net's exception for one coarse, thinly sampled axis."""
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    coarse_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    few_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[others])
    if coarse_spacing and few_voxels:
        chosen = np.percentile(spacings[:, worst], 10)
        if chosen < max(target[others]):
            chosen = max(max(target[others]), chosen) + 1e-5
        target[worst] = chosen
        return target, (
            "median spacing, except the coarse axis: > 3x coarser and > 3x fewer voxels than "
            "the others, so it takes the 10th percentile of its spacings to limit "
            "interpolation artefacts"
        )
    return target, "median spacing of the training cases (no strongly anisotropic axis)"


def normalisation_schemes(
    channel_names: dict[str, str], median_relative_size_after_cropping: float
) -> tuple[list[str], list[bool], str]:
    schemes = [
        NORMALISATION_BY_CHANNEL_NAME.get(name.casefold(), "ZScoreNormalization")
        for _, name in sorted(channel_names.items(), key=lambda kv: int(kv[0]))
    ]
    cropping_shrank = median_relative_size_after_cropping < 0.75
    use_mask = [cropping_shrank and s == "ZScoreNormalization" for s in schemes]
    kept = f"{median_relative_size_after_cropping:.0%}"
    where = (
        f", within the non-zero mask because cropping left {kept} of the median case"
        if cropping_shrank
        else f" over the whole crop (cropping left {kept} of the median case)"
    )
    reason = (
        "CT channels: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground "
        "mean/std of the dataset; other channels: per-case z-score" + where
    )
    return schemes, use_mask, reason


def _configuration(
    spacing: np.ndarray,
    median_shape: np.ndarray,
    n_voxels_dataset: float,
    n_classes: int,
    budget: float,
    preset: Planner,
) -> dict:
    inverse = 1.0 / np.asarray(spacing)
    initial = [round(v) for v in inverse * (256**3 / np.prod(inverse)) ** (1 / 3)]
    initial = [min(i, m) for i, m in zip(initial, median_shape, strict=True)]
    topology = pool_and_conv_props(spacing, initial)
    estimate = preset.estimate(topology, n_classes)
    shrunk = 0
    while estimate / REFERENCE_BATCH_SIZE * MIN_BATCH_SIZE > budget:
        ratios = [p / m for p, m in zip(topology.patch_size, median_shape, strict=True)]
        axis = int(np.argsort(ratios)[-1])
        patch = list(topology.patch_size)
        trial = list(patch)
        trial[axis] -= topology.divisible_by[axis]
        step = pool_and_conv_props(spacing, trial).divisible_by[axis]
        patch[axis] -= step
        topology = pool_and_conv_props(spacing, patch)
        estimate = preset.estimate(topology, n_classes)
        shrunk += 1
    batch_size = round(budget / estimate * REFERENCE_BATCH_SIZE)
    fraction = preset.max_dataset_fraction_per_batch
    cap = round(n_voxels_dataset * fraction / np.prod(topology.patch_size, dtype=np.float64))
    batch_size = max(min(batch_size, cap), MIN_BATCH_SIZE)
    return {
        "batch_size": int(batch_size),
        "patch_size": list(topology.patch_size),
        "median_image_size_in_voxels": [float(v) for v in median_shape],
        "spacing": [float(v) for v in spacing],
        # turned into plans' architecture in array order at the end
        "architecture": (topology, preset),
        "estimated_activations": int(estimate),
        "reasons": {
            "patch_size": (
                "256^3-voxel box shaped like 1/spacing, clipped to the median shape, padded to "
                f"a multiple of 2^pools; shrunk {shrunk} time(s) to fit {budget / 1e6:.0f}M "
                f"activations ({estimate / 1e6:.0f}M used)"
            ),
            "batch_size": (
                f"memory budget allows {round(budget / estimate * REFERENCE_BATCH_SIZE)}, "
                f"{fraction:.0%} of the dataset allows {cap}, minimum {MIN_BATCH_SIZE}"
            ),
            "architecture": (
                f"{topology.n_stages} stages: pool an axis while its feature map stays >= 8 "
                "voxels and its spacing is within 2x of the finest; kernels 3 along axes "
                "within 2x of the finest spacing, 1 otherwise; features 32 doubling to 320"
                + ("; residual encoder, blocks per stage "
                   f"{RESENC_BLOCKS_PER_STAGE[:topology.n_stages]}, one conv per decoder stage"
                   if preset.residual else "")
            ),
        },
    }


def _lowres_configuration(
    fullres: dict, median_shape: np.ndarray, n_training: int, n_classes: int, budget: float,
    preset: Planner,
) -> dict | None:
    median_voxels = float(np.prod(median_shape, dtype=np.float64))
    patch_voxels = float(np.prod(fullres["patch_size"], dtype=np.float64))
    fullres_spacing = np.asarray(fullres["spacing"])
    spacing = fullres_spacing.copy()
    lowres = None
    while patch_voxels / median_voxels < LOWRES_THRESHOLD:
        largest = spacing.max()
        if np.any(largest / spacing > 2):
            spacing[largest / spacing > 2] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        shape = fullres_spacing / spacing * median_shape
        median_voxels = float(np.prod(shape, dtype=np.float64))
        lowres = _configuration(
            spacing,
            np.array([round(v) for v in shape], dtype=float),
            median_voxels * n_training,
            n_classes,
            budget,
            preset,
        )
        patch_voxels = float(np.prod(lowres["patch_size"], dtype=np.float64))
    if lowres is None or np.prod(median_shape, dtype=np.float64) / median_voxels < 2:
        return None
    lowres["reasons"]["spacing"] = (
        "a fullres patch covers < 25% of the median image: spacing raised in 3% steps (coarse "
        "axes first) until a patch covers >= 25%"
    )
    return lowres


def _architecture(topology: Topology, preset: Planner, back: Sequence[int]) -> dict:
    """nnU-Net's `architecture` entry for TOPOLOGY (the network class nnU-Net would build;
    `nnunet` builds the plain one as a MONAI DynUNet), per-axis lists in (i, j, k) order."""
    n = topology.n_stages
    kwargs = {
        "n_stages": n,
        "features_per_stage": list(topology.features_per_stage),
        "kernel_sizes": [[k[a] for a in back] for k in topology.kernel_sizes],
        "strides": [[s[a] for a in back] for s in topology.strides],
    }
    if preset.residual:
        kwargs["n_blocks_per_stage"] = list(RESENC_BLOCKS_PER_STAGE[:n])
        kwargs["n_conv_per_stage_decoder"] = [RESENC_CONVS_PER_DECODER_STAGE] * (n - 1)
    else:
        kwargs["n_conv_per_stage"] = [CONVS_PER_STAGE] * n
        kwargs["n_conv_per_stage_decoder"] = [CONVS_PER_STAGE] * (n - 1)
    return {"network_class_name": preset.network_class_name, "arch_kwargs": kwargs}


def _to_array_order(config: dict, back: Sequence[int]) -> None:
    """Permute every per-axis list of a configuration from the working order to (i, j, k);
    the topology becomes nnU-Net's `architecture` entry on the way."""
    for key, value in config.items():
        if key == "architecture":
            config[key] = _architecture(*value, back)
        elif key in ("patch_size", "median_image_size_in_voxels", "spacing"):
            config[key] = [value[a] for a in back]
