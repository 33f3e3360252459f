"""The model registry: each baseline builds from its options and the plans, and fits its patch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.models import (
    MODELS,
    ModelOptions,
    ModelSpec,
    NetworkShape,
    build_model,
    fit_patch_size,
    register,
)
from medpipe.planning.plans import ArchitectureKwargs
from medpipe.training_settings import OptimizerConfig

# an anisotropic plan (as nnU-Net makes for 1 x 1 x 4 mm data): no pooling and 3x3x1 kernels
# on the coarse last axis at first, so the DynUNet must follow it axis by axis
ANISOTROPIC = ArchitectureKwargs(
    n_stages=4,
    features_per_stage=(8, 16, 32, 64),
    kernel_sizes=((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
    n_conv_per_stage=(2, 2, 2, 2),
    n_conv_per_stage_decoder=(2, 2, 2),
)
SMALL = {
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "nnunet": {},
}


@pytest.mark.parametrize("name", ["unet", "swin_unetr", "nnunet"])
def test_each_baseline_maps_a_fitted_patch_to_class_scores(name):
    shape = NetworkShape(in_channels=2, out_channels=4, architecture=ANISOTROPIC)
    patch = fit_patch_size(name, (70, 50, 12), shape, SMALL[name])
    net = build_model(name, shape, SMALL[name]).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 2, *patch))
    assert out.shape == (1, 4, *patch)


def test_patch_is_rounded_down_to_what_each_net_accepts():
    shape = NetworkShape(1, 2, ANISOTROPIC)
    assert fit_patch_size("nnunet", (80, 48, 12), shape) == (80, 48, 12)  # multiples 8, 8, 4
    assert fit_patch_size("nnunet", (83, 50, 13), shape) == (80, 48, 12)
    assert fit_patch_size("unet", (83, 50, 13), shape, SMALL["unet"]) == (80, 48, 12)
    assert fit_patch_size("swin_unetr", (100, 70, 12), shape) == (96, 64, 64)  # min 64


def test_nnunet_follows_the_plans_kernels_strides_and_features():
    net = build_model("nnunet", NetworkShape(1, 3, ANISOTROPIC))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs[0].kernel_size == (3, 3, 1) and convs[0].out_channels == 8
    strided = [m.stride for m in convs if m.stride != (1, 1, 1)]
    assert strided[:3] == [(2, 2, 1), (2, 2, 2), (2, 2, 2)]
    assert max(m.out_channels for m in convs) == 64


def test_nnunet_deep_supervision_outputs_while_training():
    net = build_model("nnunet", NetworkShape(1, 3, ANISOTROPIC)).train()
    outputs = net(torch.randn(2, 1, 32, 32, 8))
    # the full-size output + n_stages - 3 lower levels, each at its own level's size (as
    # nnU-Net scores them; MONAI's DynUNet would upsample them to the patch)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 8), (2, 3, 16, 16, 8)]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 32, 8)).shape == (1, 3, 32, 32, 8)
    single = build_model("nnunet", NetworkShape(1, 3, ANISOTROPIC), {"deep_supervision": False})
    assert single.train()(torch.randn(2, 1, 32, 32, 8)).shape == (2, 3, 32, 32, 8)


# the same topology as nnU-Net's ResEnc presets plan it: residual blocks 1, 3, 4, 6
RESIDUAL = ANISOTROPIC.model_copy(update={"n_conv_per_stage": None,
                                          "n_blocks_per_stage": (1, 3, 4, 6),
                                          "n_conv_per_stage_decoder": (1, 1, 1)})


def test_nnunet_resenc_is_nnunets_residual_encoder_unet():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    net = build_model("nnunet_resenc", NetworkShape(1, 3, RESIDUAL))
    assert isinstance(net, ResidualEncoderUNet)
    assert [len(stage.blocks) for stage in net.encoder.stages] == [1, 3, 4, 6]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs[0].kernel_size == (3, 3, 1) and convs[0].bias is not None
    # training: one output per decoder level, full size first, each at its level's size,
    # without the lowest (nnU-Net weights it 0): the same outputs as the `nnunet` model's
    outputs = net.train()(torch.randn(2, 1, 32, 32, 8))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 8), (2, 3, 16, 16, 8)]
    with torch.no_grad():  # evaluation and inference: the full-size output alone
        assert net.eval()(torch.randn(1, 1, 32, 32, 8)).shape == (1, 3, 32, 32, 8)
    with pytest.raises(MedpipeError, match="Residual Encoder planner"):
        build_model("nnunet_resenc", NetworkShape(1, 3, ANISOTROPIC))


def test_unknown_model_and_bad_options_are_clear_errors():
    known = r"unknown model 'vnet'.*nnunet, nnunet_resenc, pyramid, swin_unetr, unet"
    with pytest.raises(MedpipeError, match=known):
        build_model("vnet", NetworkShape(1, 2))
    with pytest.raises(MedpipeError, match="feature_size"):
        build_model("swin_unetr", NetworkShape(1, 2), {"feature_size": 20})
    with pytest.raises(MedpipeError, match="chanels"):
        build_model("unet", NetworkShape(1, 2), {"chanels": [4, 8]})
    with pytest.raises(MedpipeError, match=r"configured from plans\.json"):
        build_model("nnunet", NetworkShape(1, 2))  # no plans' topology


def test_a_fourth_model_is_one_builder_and_one_entry():
    class TinyOptions(ModelOptions):
        width: int = 4

    def build(shape, options):
        return nn.Sequential(
            nn.Conv3d(shape.in_channels, options.width, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(options.width, shape.out_channels, 1),
        )

    register(ModelSpec("tiny_test_net", "segmentation", TinyOptions, build,
                       lambda shape, options: (1, 1, 1), OptimizerConfig(name="adamw", lr=1e-3)))
    try:
        net = build_model("tiny_test_net", NetworkShape(1, 3), {"width": 2})
        assert net(torch.randn(1, 1, 5, 5, 5)).shape == (1, 3, 5, 5, 5)
    finally:
        del MODELS["tiny_test_net"]


@pytest.mark.parametrize(
    ("name", "options"),
    [("voxelmorph", {}), ("voxelmorph_diff", {}), ("voxelmorph_diff", {"half_resolution": True})],
)
def test_registration_nets_return_the_warped_image_and_a_field(name, options):
    shape = NetworkShape(1, 3)
    patch = fit_patch_size(name, (66, 78, 63), shape, options)
    assert all(p % (16 if options else 8) == 0 for p in patch)
    net = build_model(name, shape, options)
    moving, fixed = torch.rand(1, 1, *patch), torch.rand(1, 1, *patch)
    warped, ddf = net(moving, fixed)
    assert warped.shape == moving.shape and ddf.shape == (1, 3, *patch)
    with torch.no_grad():  # a net that predicts no motion must return the moving image
        for parameter in net.parameters():
            parameter.zero_()
        warped, ddf = net(moving, fixed)
    assert torch.count_nonzero(ddf) == 0
    torch.testing.assert_close(warped, moving)


@pytest.mark.parametrize("name", ["voxelmorph", "voxelmorph_diff"])
def test_a_constant_field_is_a_translation_in_voxels_along_the_array_axes(name):
    """A net whose output is a constant c: plain VoxelMorph returns c as the field; the
    diffeomorphic one integrates c as a stationary velocity, whose exponential is the
    translation c again; either way the warped image is moving(x + c), in array axes (the
    convention `registration.fields` turns into ITK's)."""
    shift = (2.0, -1.0, 0.0)
    net = build_model(name, NetworkShape(1, 3))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        net.backbone.net[1].final_conv_out.conv.bias.copy_(torch.tensor(shift))
    moving = torch.rand(1, 1, 24, 24, 24)
    warped, ddf = net(moving, torch.rand_like(moving))
    inner = (slice(None), slice(None), *(slice(4, -4),) * 3)
    expected = torch.tensor(shift).view(1, 3, 1, 1, 1).expand_as(ddf)
    torch.testing.assert_close(ddf[inner], expected[inner], atol=1e-3, rtol=0)
    shifted = torch.roll(moving, shifts=(-2, 1, 0), dims=(2, 3, 4))  # moving[x + c]
    torch.testing.assert_close(warped[inner], shifted[inner], atol=1e-3, rtol=0)


def test_registration_models_are_not_segmentation_models():
    from medpipe.models import model_spec

    with pytest.raises(MedpipeError, match="known segmentation models: nnunet"):
        model_spec("voxelmorph", task="segmentation")


def test_whole_volume_sums_leave_a_device_that_cannot_hold_them():
    """A 512^3 CT with 4 classes needs ~11 GB of sums (mirrored): on a GPU that has less to
    spare they accumulate in host memory; the windows still run on the GPU."""
    from medpipe.models.sliding_window import accumulation_bytes, accumulation_device

    ct = (512, 512, 512)
    assert accumulation_bytes(ct, 4, mirrored=True) == 4 * 512**3 * (5 * 4 + 1)
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert accumulation_device(gpu, ct, 4, True, budget_bytes=24 * 2**30) == gpu
    assert accumulation_device(gpu, ct, 4, True, budget_bytes=8 * 2**30).type == "cpu"
    assert accumulation_device(torch.device("cpu"), ct, 4, True, budget_bytes=1).type == "cpu"


def test_sums_kept_elsewhere_give_the_same_probabilities():
    from medpipe.models.sliding_window import predict_probabilities

    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, 3, padding=1)
    image = torch.randn(1, 20, 18, 16).numpy()
    plain = predict_probabilities(net, image, (8, 8, 8), torch.device("cpu"), mirror_axes=(0,))
    budgeted = predict_probabilities(net, image, (8, 8, 8), torch.device("cpu"),
                                     mirror_axes=(0,), classes=3, budget_bytes=1)
    assert torch.allclose(plain, budgeted) and plain.shape == (3, 20, 18, 16)
