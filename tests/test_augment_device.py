"""nnU-Net's augmentation on the device (`training.augment_device`) against
batchgeneratorsv2's own transforms (what `training.augment` runs in the loader): the same
parameter distributions over many samples, and the same output for the same parameters."""

from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.spatial import (
    SpatialTransform,
    _convert_my_grid_to_grid_sample_grid,
    _create_centered_identity_grid2,
)
from scipy.stats import ks_2samp

from medpipe.training.augment import _seeded, nnunet_augmentation
from medpipe.training.augment_device import DeviceAugmenter, draw_parameters, supports

PATCH = (12, 14, 10)
CHANNELS = 2


def _blobs(shape, seed):
    """A 2-channel image with structure and a 3-label map."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    image = np.stack([gaussian_filter(rng.standard_normal(shape), 1.5) for _ in range(CHANNELS)])
    image = image / image.std() + 1.0
    label = (image[0] > 1.3).astype(np.int16) + (image[1] > 1.6)
    return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(label[None])


def _reference_chain(image, label, params, augmenter):
    """batchgeneratorsv2's transforms, as nnU-Net composes them, applied to one sample with
    PARAMS (ours, converted to theirs), noise left out."""
    from batchgeneratorsv2.transforms.intensity.brightness import (
        MultiplicativeBrightnessTransform,
    )
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import (
        SimulateLowResolutionTransform,
    )
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

    spatial = SpatialTransform(PATCH, 0, False, p_rotation=0.2, p_scaling=0.2,
                               border_mode_seg="constant", padding_value_seg=-1)
    shape = image.shape[1:]
    if params["spatial"]:
        grid = _create_centered_identity_grid2(PATCH).float() @ params["affine"].T
        grid = _convert_my_grid_to_grid_sample_grid(grid, shape)
    else:
        grid = None
    spatial_params = {"center_location_in_pixels": [s / 2 for s in shape], "grid": grid}
    image = spatial._apply_to_image(image.clone(), **spatial_params)
    label = spatial._apply_to_segmentation(label.clone(), **spatial_params)

    def chosen(key):
        return torch.nonzero(params[key]).flatten()

    blur = GaussianBlurTransform((0.5, 1.0), p_per_channel=0.5, benchmark=False)
    image = blur._apply_to_image(image, apply_to_channel=params["blur"],
                                 sigmas=params["blur_sigma"][params["blur"]].tolist())
    brightness = MultiplicativeBrightnessTransform((0.75, 1.25), False)
    image = brightness._apply_to_image(image, apply_to_channel=torch.arange(CHANNELS),
                                       multipliers=params["brightness"])
    contrast = ContrastTransform((0.75, 1.25), preserve_range=True, synchronize_channels=False)
    image = contrast._apply_to_image(image, apply_to_channel=chosen("contrast"),
                                     multipliers=params["contrast_factor"][params["contrast"]])
    lowres = SimulateLowResolutionTransform((0.5, 1), False, True, None)
    scales = params["lowres_scale"][params["lowres"]][:, None].expand(-1, 3)
    image = lowres._apply_to_image(image, apply_to_channel=chosen("lowres"), scales=scales)
    for key, invert in (("gamma_inverted", True), ("gamma", False)):
        n = int(params[key].sum())
        gamma = GammaTransform((0.7, 1.5), float(invert), False, 1, 1)
        image = gamma._apply_to_image(image, apply_to_channel=chosen(key),
                                      retain_stats=torch.ones(n, dtype=torch.bool),
                                      invert_image=torch.full((n,), invert),
                                      gamma=params[f"{key}_value"][params[key]])
    axes = [a for a in range(3) if params["mirror"][a]]
    mirror = MirrorTransform((0, 1, 2))
    image = mirror._apply_to_image(image, axes=axes)
    label = mirror._apply_to_segmentation(label, axes=axes)
    return image, torch.where(label == -1, 0, label)


def test_the_same_parameters_give_batchgenerators_output():
    """40 samples, every transform drawn several times: images within float error, labels
    equal but at float16 near-ties of two labels' scores."""
    augmenter = DeviceAugmenter(PATCH, label_values=(0, 1, 2))
    size = augmenter.input_size
    samples = [_blobs(size, seed) for seed in range(40)]
    params = [draw_parameters(np.random.default_rng(seed), CHANNELS, PATCH) for seed in range(40)]
    for p in params:
        p["noise_std"].zero_()  # the noise field is the device's own draw (tested below)
    batch = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    for key in ("spatial", "blur", "contrast", "lowres", "gamma_inverted", "gamma", "mirror"):
        assert int(batch[key].sum()) > 0, key  # every transform is exercised
    image, label = augmenter(torch.stack([s[0] for s in samples]),
                             torch.stack([s[1] for s in samples]).long(), batch)
    assert image.shape == (40, CHANNELS, *PATCH) and label.shape == (40, 1, *PATCH)
    for index, (sample, p) in enumerate(zip(samples, params, strict=True)):
        ref_image, ref_label = _reference_chain(*sample, p, augmenter)
        assert torch.allclose(image[index], ref_image, atol=1e-4, rtol=1e-4), index
        assert (label[index] != ref_label.long()).float().mean() < 0.002, index
    assert set(label.unique().tolist()) == {0, 1, 2}


def test_the_noise_field_has_the_drawn_spread():
    augmenter = DeviceAugmenter(PATCH, label_values=(0,))
    image = torch.zeros(3, CHANNELS, *augmenter.input_size)
    params = [draw_parameters(np.random.default_rng(seed), CHANNELS, PATCH) for seed in range(3)]
    for p, std in zip(params, (0.0, 0.05, 0.1), strict=True):
        p.update(noise_std=torch.tensor(std), contrast=torch.zeros(CHANNELS, dtype=bool),
                 spatial=torch.tensor(False), blur=torch.zeros(CHANNELS, dtype=bool),
                 lowres=torch.zeros(CHANNELS, dtype=bool),
                 gamma=torch.zeros(CHANNELS, dtype=bool),
                 gamma_inverted=torch.zeros(CHANNELS, dtype=bool),
                 brightness=torch.ones(CHANNELS))
    batch = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    out, _ = augmenter(image, torch.zeros(3, 1, *augmenter.input_size, dtype=torch.long), batch)
    spreads = out.flatten(1).std(1).tolist()
    assert spreads[0] == 0 and abs(spreads[1] - 0.05) < 0.005 and abs(spreads[2] - 0.1) < 0.01


def _reference_parameters(n: int) -> dict[str, list]:
    """The parameters batchgeneratorsv2's chain draws over N samples (its own RNG calls),
    recorded from each transform's `get_parameters` while it runs on a small patch."""
    chain = nnunet_augmentation((16, 16, 16))
    records: dict[str, list] = {}

    def record(transform, name):
        original = transform.get_parameters

        def recording(**data):
            params = original(**data)
            records.setdefault(name, []).append(params)
            return params

        transform.get_parameters = recording

    for step in chain.transforms:
        inner = getattr(step, "transform", step)
        record(inner, type(inner).__name__ + ("_inv" if getattr(inner, "p_invert_image", 0)
                                              else ""))
        if inner is not step:
            record(step, "apply_" + type(inner).__name__
                   + ("_inv" if getattr(inner, "p_invert_image", 0) else ""))
    image, label = _blobs((25, 25, 25), 0)
    for seed in range(n):
        with _seeded(seed):
            chain(image=image[:1].clone(), segmentation=label.clone())
    return records


def test_parameters_follow_nnunets_distributions():
    """Ours over 3000 samples against batchgeneratorsv2's over 3000: how often each
    transform applies (within 4.5 standard errors) and the drawn values (two-sample
    Kolmogorov-Smirnov, p > 1e-3)."""
    n = 3000
    ours = [draw_parameters(np.random.default_rng([1, seed]), 1, (16, 16, 16))
            for seed in range(n)]
    theirs = _reference_parameters(n)

    def same_rate(a: float, b: float):
        p = (a + b) / 2
        assert abs(a - b) < 4.5 * np.sqrt(2 * p * (1 - p) / n) + 1e-9, (a, b)

    def same_values(a, b, name):
        assert ks_2samp(a, b).pvalue > 1e-3, name

    # spatial: rotated or scaled in 1 - 0.8^2 of samples; the scale factor; the rotation
    spatial = [p for p in theirs["SpatialTransform"] if p["affine"] is not None]
    ours_spatial = [p for p in ours if p["spatial"]]
    same_rate(len(ours_spatial) / n, len(spatial) / n)

    def scale(affine):  # rounded: ours is stored in float32
        return round(float(np.cbrt(abs(np.linalg.det(np.asarray(affine, dtype=float))))), 5)

    def trace(affine):
        return round(float(np.trace(np.asarray(affine, dtype=float))) / scale(affine), 5)

    same_values([scale(p["affine"]) for p in ours_spatial], [scale(p["affine"]) for p in spatial],
                "scale")
    same_values([trace(p["affine"]) for p in ours_spatial], [trace(p["affine"]) for p in spatial],
                "rotation")

    def applied(name):
        return [p["apply_transform"] for p in theirs[f"apply_{name}"]]

    # noise, its spread
    same_rate(np.mean([p["noise_std"] > 0 for p in ours]), np.mean(applied(
        "GaussianNoiseTransform")))
    same_values([float(p["noise_std"]) for p in ours if p["noise_std"] > 0],
                [p["sigmas"] for p in theirs["GaussianNoiseTransform"]], "noise")
    # blur: per channel, and its sigmas
    blurred = [p for p in theirs["GaussianBlurTransform"]]
    same_rate(np.mean([bool(p["blur"][0]) for p in ours]),
              np.mean(applied("GaussianBlurTransform")) * np.mean(
                  [bool(p["apply_to_channel"][0]) for p in blurred]))
    same_values(np.concatenate([p["blur_sigma"][0].numpy() for p in ours if p["blur"][0]]),
                np.concatenate([np.ravel(p["sigmas"]) for p in blurred if p["sigmas"]]), "blur")
    # brightness and contrast factors
    for key, name, field in (("brightness", "MultiplicativeBrightnessTransform", "multipliers"),
                             ("contrast_factor", "ContrastTransform", "multipliers")):
        mine = [float(p[key][0]) for p in ours if float(p[key][0]) != 1.0]
        same_rate(len(mine) / n, np.mean(applied(name)))
        same_values(mine, [float(p[field][0]) for p in theirs[name]], name)
    # low resolution: per channel, its scale
    lowres = theirs["SimulateLowResolutionTransform"]
    same_rate(np.mean([bool(p["lowres"][0]) for p in ours]),
              np.mean(applied("SimulateLowResolutionTransform"))
              * np.mean([len(p["apply_to_channel"]) > 0 for p in lowres]))
    same_values([float(p["lowres_scale"][0]) for p in ours if p["lowres"][0]],
                [float(p["scales"][0, 0]) for p in lowres if len(p["scales"])], "lowres")
    # gamma, inverted and not
    for key, name in (("gamma_inverted", "GammaTransform_inv"), ("gamma", "GammaTransform")):
        same_rate(np.mean([bool(p[key][0]) for p in ours]), np.mean(applied(name)))
        same_values([float(p[f"{key}_value"][0]) for p in ours if p[key][0]],
                    [float(p["gamma"][0]) for p in theirs[name]], name)
    # mirroring, per axis
    for axis in range(3):
        same_rate(np.mean([bool(p["mirror"][axis]) for p in ours]),
                  np.mean([axis in p["axes"] for p in theirs["MirrorTransform"]]))


def test_in_plane_patches_stay_with_the_loader():
    assert supports((64, 64, 48)) and not supports((8, 160, 160))
