"""Fingerprint and plans: nnU-Net's rules on hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_dataset

from medpipe.errors import MedpipeError
from medpipe.io import read_image
from medpipe.planning import fingerprint_dataset, plan_experiment
from medpipe.planning.planner import fullres_target_spacing, normalisation_schemes
from medpipe.planning.plans import read_plans, write_plans
from medpipe.planning.topology import feature_map_voxels, pool_and_conv_props


def test_isotropic_topology_pools_all_axes_to_the_minimum_edge():
    topology = pool_and_conv_props([3.0, 3.0, 3.0], [66, 78, 63])
    assert topology.patch_size == (80, 80, 64)  # padded to multiples of 2**pools
    assert topology.pool_per_axis == (4, 4, 4)
    assert topology.strides[0] == (1, 1, 1)
    assert all(k == (3, 3, 3) for k in topology.kernel_sizes)
    assert topology.features_per_stage == (32, 64, 128, 256, 320)


def test_anisotropic_topology_uses_in_plane_kernels_first():
    topology = pool_and_conv_props([1.0, 1.0, 4.0], [197, 233, 47])
    # the 4 mm axis is not pooled until the in-plane spacing has caught up (1 -> 2 -> 4)
    assert [s[2] for s in topology.strides[:3]] == [1, 1, 1]
    assert topology.kernel_sizes[0] == (3, 3, 1)
    assert topology.kernel_sizes[2] == (3, 3, 3)
    # 197 and 233 are pooled 5 times (to 7 and 8 voxels), 47 three times: pad to 32, 32, 8
    assert topology.pool_per_axis == (5, 5, 3)
    assert topology.patch_size == (224, 256, 48)


def test_feature_map_count_by_hand_for_two_stages():
    small = pool_and_conv_props([1.0, 1.0, 1.0], [8, 8, 8])
    assert small.n_stages == 2  # 8 -> 4 voxels, then no axis is >= 8 any more
    # encoder: 2 convs x 32 features x 8^3 + 2 x 64 x 4^3; decoder at 8^3: 2 convs and the
    # transposed conv with 32 features, plus the 3-class head
    expected = 2 * 32 * 512 + 2 * 64 * 64 + 3 * 32 * 512 + 3 * 512
    assert feature_map_voxels(small, n_classes=3) == expected
    # a single poolable axis needs >= 12 voxels to be pooled again (nnU-Net's 3 x 4 rule)
    assert pool_and_conv_props([1.0, 4.0, 4.0], [11, 4, 4]).n_stages == 1


def test_target_spacing_takes_tenth_percentile_on_a_thin_coarse_axis():
    spacings = np.array([[5.0, 0.8, 0.8], [6.0, 0.8, 0.8], [10.0, 0.7, 0.7], [8, 0.8, 0.8]])
    shapes = np.array([[20, 512, 512]] * 4)
    target, reason = fullres_target_spacing(spacings, shapes)
    np.testing.assert_allclose(target, [np.percentile([5, 6, 10, 8], 10), 0.8, 0.8])
    assert "10th percentile" in reason
    iso, reason = fullres_target_spacing(spacings, np.array([[200, 512, 512]] * 4))
    np.testing.assert_allclose(iso, [7.0, 0.8, 0.8])  # many slices: plain median
    assert "median" in reason


def test_normalisation_follows_channel_names_and_crop_ratio():
    schemes, mask, _ = normalisation_schemes({"0": "CT", "1": "T2"}, 0.6)
    assert schemes == ["CTNormalization", "ZScoreNormalization"]
    assert mask == [False, True]  # CT is never masked; cropping shrank, so z-score is
    _, mask, reason = normalisation_schemes({"0": "T1"}, 0.9)
    assert mask == [False] and "whole crop" in reason


def test_fingerprint_and_plans_of_a_small_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", n_cases=3, n_channels=2, shape=(24, 20, 16))
    fingerprint = fingerprint_dataset(root)
    assert len(fingerprint["cases"]) == 3
    case = fingerprint["cases"][0]
    assert case["shape"] == [24, 20, 16]
    assert set(fingerprint["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    foreground = np.concatenate(
        [
            read_image(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz").array[
                read_image(root / "labelsTr" / f"case_{i:03d}.nii.gz").array > 0
            ]
            for i in range(3)
        ]
    )
    assert stats["mean"] == pytest.approx(foreground.mean(), abs=0.02)
    assert stats["std"] == pytest.approx(foreground.std(), rel=0.02)
    assert stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"]

    plans = plan_experiment(fingerprint)
    config = plans.configuration("3d_fullres")
    np.testing.assert_allclose(config.spacing, fingerprint["median_spacing"])
    # every patch axis is a whole number of the net's total downsampling along that axis,
    # and the net pools every axis at least once at these sizes
    strides = np.array(config.architecture.arch_kwargs.strides)
    total = strides.prod(axis=0)
    assert np.all(total >= 2)
    assert np.all(np.array(config.patch_size) % total == 0), (config.patch_size, total)
    assert config.batch_size >= 2
    assert {"spacing", "patch_size", "batch_size", "architecture", "normalization_schemes"} <= set(
        config.reasons
    )
    assert "3d_lowres" not in plans.configurations
    # plans.json round trip: what is written reads back to the same plans
    write_plans(plans, tmp_path / "plans.json")
    assert read_plans(tmp_path / "plans.json") == plans


def test_large_images_get_a_lowres_configuration():
    fingerprint = {
        "dataset_json": {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}},
        "cases": [{"spacing": [0.8, 0.8, 0.8], "shape_after_crop": [512, 512, 512]}] * 10,
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {},
    }
    plans = plan_experiment(fingerprint)
    lowres, fullres = plans.configuration("3d_lowres"), plans.configuration("3d_fullres")
    assert min(lowres.spacing) > max(fullres.spacing)
    assert np.prod(lowres.patch_size) / np.prod(lowres.median_image_size_in_voxels) >= 0.25
    assert fullres.normalization_schemes == ("CTNormalization",)


def test_plans_with_a_bad_field_are_refused_naming_it(tmp_path):
    plans = plan_experiment({
        "dataset_json": {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "MR"}},
        "cases": [{"spacing": [1.0, 1.0, 1.0], "shape_after_crop": [64, 64, 64]}] * 4,
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {},
    })
    data = plans.model_dump(mode="json")
    data["configurations"]["3d_fullres"]["patch_size"] = [64, 64]  # one axis short
    path = tmp_path / "plans.json"
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(MedpipeError, match=r"plans\.json.*configurations\.3d_fullres\.patch_size"):
        read_plans(path)
    with pytest.raises(MedpipeError, match="medpipe plan"):
        read_plans(tmp_path / "missing.json")


@pytest.mark.parametrize(("spacing", "patch"), [((1, 1, 1), (128, 128, 128)),
                                                ((3, 0.8, 0.8), (40, 192, 160)),
                                                ((1, 1, 1), (66, 78, 63))])
def test_activation_counts_are_those_of_nnunets_own_networks(spacing, patch):
    # what the planner sizes patches by, against dynamic-network-architectures' own count
    import torch
    from dynamic_network_architectures.architectures.unet import (
        PlainConvUNet,
        ResidualEncoderUNet,
    )
    from torch import nn

    from medpipe.planning.topology import (
        RESENC_BLOCKS_PER_STAGE,
        feature_map_voxels,
        pool_and_conv_props,
        resenc_feature_map_voxels,
    )

    topology = pool_and_conv_props(spacing, patch)
    n = topology.n_stages
    common = {"input_channels": 1, "n_stages": n,
              "features_per_stage": topology.features_per_stage, "conv_op": nn.Conv3d,
              "kernel_sizes": [list(k) for k in topology.kernel_sizes],
              "strides": [list(s) for s in topology.strides], "num_classes": 4,
              "conv_bias": True, "norm_op": nn.InstanceNorm3d}
    with torch.device("meta"):  # the count needs the structure, not the weights
        residual = ResidualEncoderUNet(**common, n_blocks_per_stage=RESENC_BLOCKS_PER_STAGE[:n],
                                       n_conv_per_stage_decoder=(1,) * (n - 1))
        plain = PlainConvUNet(**common, n_conv_per_stage=2,
                              n_conv_per_stage_decoder=(2,) * (n - 1))
    assert resenc_feature_map_voxels(topology, 4) == int(
        residual.compute_conv_feature_map_size(topology.patch_size))
    assert feature_map_voxels(topology, 4) == int(
        plain.compute_conv_feature_map_size(topology.patch_size))
