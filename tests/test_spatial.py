"""Spatial transforms stay float32 under autocast, and compose, integrate and upsample fields
as their definitions say (checked against warping step by step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from test_fields import smooth_ddf, smooth_image

from medpipe.models import NetworkShape, build_model
from medpipe.spatial import compose, integrate, upsample_field, warp

SHAPE = (32, 28, 24)
BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def image_and_field(amplitude=2.5):
    image = torch.from_numpy(smooth_image(SHAPE))[None, None]
    ddf = torch.from_numpy(smooth_ddf(SHAPE, amplitude))[None]
    return image, ddf


def test_monai_warp_under_autocast_is_what_these_transforms_avoid():
    """The bug: a bf16 field through MONAI's Warp samples on a coarse lattice."""
    image, ddf = image_and_field()
    exact = Warp("bilinear", "zeros")(image, ddf)
    with torch.autocast(**BF16):
        lattice = Warp("bilinear", "zeros")(image.bfloat16(), ddf.bfloat16())
        ours = warp(image.bfloat16(), ddf.bfloat16())
    assert (lattice.float() - exact).abs().max() > 1e-2
    assert ours.dtype == torch.float32
    # only the inputs' rounding to bf16 remains (the field: |u| <= 2.5 voxels, 2^-8 relative)
    rounded = Warp("bilinear", "zeros")(image.bfloat16().float(), ddf.bfloat16().float())
    torch.testing.assert_close(ours, rounded, atol=1e-6, rtol=0)


@pytest.mark.parametrize("function", ["integrate", "compose", "upsample"])
def test_field_arithmetic_is_float32_and_the_same_under_autocast(function):
    _, ddf = image_and_field(1.0)
    run = {"integrate": lambda f: integrate(f, 7), "compose": lambda f: compose(f, 0.5 * f),
           "upsample": lambda f: upsample_field(f, (64, 56, 48))}[function]
    plain = run(ddf)
    with torch.autocast(**BF16):
        under = run(ddf)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,options", [
    ("voxelmorph", {}), ("voxelmorph_diff", {}), ("voxelmorph_diff", {"half_resolution": True}),
])
def test_voxelmorph_transform_part_under_bf16_equals_the_fp32_path(name, options):
    """The U-Net may run in bf16; from its output on, warped image and field equal the
    float32 path within 1e-4 (voxels; the image in its own units)."""
    torch.manual_seed(0)
    net = build_model(name, NetworkShape(1, 3), {"channels": [8, 16, 16, 16],
                                                 "final_conv_channels": [8], **options}).eval()
    moving, fixed = (torch.rand(1, 1, 32, 32, 32) for _ in range(2))
    with torch.no_grad(), torch.autocast(**BF16):
        output = net.backbone(torch.cat([moving, fixed], dim=1))
        warped, ddf = net(moving, fixed)
    assert ddf.dtype == torch.float32 and warped.dtype == torch.float32
    with torch.no_grad():
        warped32, ddf32 = net.transform(moving, output.float())
    torch.testing.assert_close(ddf, ddf32, atol=1e-4, rtol=0)
    torch.testing.assert_close(warped, warped32, atol=1e-4, rtol=0)


def test_compose_is_warping_twice():
    """moving(y + inner(y)) at y = x + outer(x) equals one warp by compose(outer, inner);
    adding the fields, or composing them the other way round, does not."""
    image, inner = image_and_field(2.0)
    outer = torch.zeros_like(inner)
    outer[:, 0], outer[:, 2] = 3.0, -2.0  # a translation: the warp by it is exact
    twice = warp(warp(image, inner), outer)
    inside = (slice(None), slice(None), *(slice(6, -6),) * 3)

    def error(field):
        return (twice - warp(image, field))[inside].abs().max()

    assert error(compose(outer, inner)) < 1e-5
    assert error(outer + inner) > 0.05 and error(compose(inner, outer)) > 0.05


def test_integration_of_a_constant_velocity_is_that_translation():
    velocity = torch.zeros(1, 3, *SHAPE)
    velocity[:, 0] = 1.5
    inside = (slice(None), slice(None), *(slice(6, -6),) * 3)  # zeros come in beyond
    torch.testing.assert_close(integrate(velocity, 7)[inside], velocity[inside], atol=1e-4,
                               rtol=0)


def test_upsampling_rescales_displacements_to_the_finer_voxels():
    """A field that moves every point by one coarse voxel moves it by two fine ones, and a
    field that is a linear function of position stays the same function of position."""
    coarse = torch.ones(1, 3, 8, 10, 6)
    assert torch.allclose(upsample_field(coarse, (16, 20, 12)), torch.full((1, 3, 16, 20, 12),
                                                                           2.0))
    # u(x) = 0.1 (x_mm - c): coarse voxel i sits at (i + 0.5) * 2 fine voxels
    index = torch.arange(8, dtype=torch.float32)
    linear = torch.zeros(1, 3, 8, 8, 8)
    linear[:, 0] = 0.1 * (index - 3.5)[:, None, None]  # in coarse voxels
    fine = upsample_field(linear, (16, 16, 16))
    fine_index = torch.arange(16, dtype=torch.float32)
    expected = 2 * 0.1 * ((fine_index + 0.5) / 2 - 0.5 - 3.5)  # in fine voxels
    torch.testing.assert_close(fine[0, 0, 2:-2, 5, 5], expected[2:-2], atol=1e-5, rtol=0)
    assert np.allclose(fine[0, 1:].numpy(), 0.0)


def test_full_precision_turns_tf32_off_inside_and_restores_it():
    from medpipe.spatial import full_precision

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # cuDNN's default on a GPU
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.zeros(1)):
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
            assert not torch.is_autocast_enabled("cpu")
        assert cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16),
                                                       ((8, 0), torch.bfloat16),
                                                       ((9, 0), torch.bfloat16)])
def test_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, expected):
    """A T4 (7.5) emulates bf16, which torch.cuda.is_bf16_supported() counts: fp16 there."""
    from medpipe.device import autocast_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), amp=True) is expected
    assert autocast_dtype(torch.device("cuda"), amp=False) is None
