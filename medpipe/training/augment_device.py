"""nnU-Net's augmentation (`training.augment`'s chain) applied to a whole batch on the
training device: `training.augment_on: device`.

Why: nnU-Net augments each patch on the CPU, in loader workers, and its users report GPUs
waiting for them (an A100 40 % busy with 8 workers, 173 of 302 ms per iteration spent
waiting for data: nnU-Net issue #3063; GPU augmentation asked for in #3063 and #2911). Here
the loader only cuts the larger patch and draws a few dozen random numbers per sample
(`draw_parameters`); the device rotates, scales, blurs, ... the batch at once
(`DeviceAugmenter`), in float32 with autocast off.

Equal to batchgeneratorsv2's chain (as `nnunet_augmentation` sets it) in distribution: the
same probabilities and ranges, drawn in `draw_parameters` (a test compares both over many
samples). For the same parameters, the same output within float error: the same grid
(nnU-Net's centred pixel grid, `align_corners=False`), the same kernels (truncated at 6
sigma, reflect padding) and formulas, and labels resampled as batchgeneratorsv2 resamples
them (linear interpolation of each label's indicator, scores in float16, the nearest
neighbour settling ties, -1 outside the box, then 0). By design two things differ: the
noise field is drawn from the device's generator, and a label's indicator is compared with
every label of the batch, not only the sample's own (an absent label scores 0 and never
wins). Patches nnU-Net augments in-plane only ("dummy 2D", anisotropic patches) are not
supported here: they stay with the loader (`supports`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.spatial.spatial import create_affine_matrix_3d

from medpipe.spatial import full_precision
from medpipe.training.augment import input_size, is_dummy_2d, rotation_range

# nnU-Net v2's probabilities and ranges (`training.augment.nnunet_augmentation`)
P_ROTATION, P_SCALING, SCALING = 0.2, 0.2, (0.7, 1.4)
P_NOISE, NOISE_STD = 0.1, (0.0, 0.1)  # batchgeneratorsv2 names it a variance, uses a std
P_BLUR, P_BLUR_CHANNEL, BLUR_SIGMA = 0.2, 0.5, (0.5, 1.0)
BLUR_TRUNCATE = 6.0  # `blur_dimension`'s default, which the transform uses
P_BRIGHTNESS, BRIGHTNESS = 0.15, (0.75, 1.25)
P_CONTRAST, CONTRAST = 0.15, (0.75, 1.25)
P_LOWRES, P_LOWRES_CHANNEL, LOWRES_SCALE = 0.25, 0.5, (0.5, 1.0)
P_GAMMA_INVERTED, P_GAMMA, GAMMA = 0.1, 0.3, (0.7, 1.5)
P_MIRROR = 0.5
EPS = 1e-7  # batchgeneratorsv2's guard in the gamma transform
# the largest blur kernel: an odd size near 6 sigma + 0.5 at sigma 1
KERNEL_SIZE = 7
SCORE_SCALE = 1000.0  # batchgeneratorsv2 scales indicators by this before float16
PAD_LABEL = -1  # labels outside the sampled box during the spatial transform


def supports(patch_size: Sequence[int]) -> bool:
    """Whether the device can augment this patch (not nnU-Net's in-plane "dummy 2D")."""
    return not is_dummy_2d(patch_size)


def _contrast_factor(rng: np.random.Generator, low: float, high: float) -> float:
    """batchgeneratorsv2's `BGContrast`: below 1 or above it with equal chance, uniform."""
    if rng.uniform() < 0.5 and low < 1:
        return rng.uniform(low, 1.0)
    return rng.uniform(max(low, 1.0), high)


def _odd_size(value: float) -> int:
    """batchgeneratorsv2's `_round_to_nearest_odd` (Python's rounding, ties to even)."""
    rounded = round(value)
    if rounded % 2 == 1:
        return rounded
    return rounded + 1 if value - rounded >= 0 else rounded - 1


def blur_kernel(sigma: float) -> np.ndarray:
    """batchgeneratorsv2's Gaussian (truncated at 6 sigma), centred in KERNEL_SIZE taps:
    the zero taps meet reflected voxels with weight 0, so the wider padding changes
    nothing."""
    size = _odd_size(sigma * BLUR_TRUNCATE + 0.5)
    half = (size - 1) / 2
    x = np.linspace(-half, half, size)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    kernel = np.zeros(KERNEL_SIZE)
    start = (KERNEL_SIZE - size) // 2
    kernel[start:start + size] = pdf / pdf.sum()
    return kernel


def draw_parameters(rng: np.random.Generator, channels: int,
                    patch_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """One sample's augmentation, drawn from nnU-Net's distributions: fixed-size tensors
    the loader collates into a batch."""
    angle_range = rotation_range(patch_size)
    rotate, scale = rng.uniform() < P_ROTATION, rng.uniform() < P_SCALING
    angles = [rng.uniform(*angle_range) for _ in range(3)] if rotate else [0.0] * 3
    factor = rng.uniform(*SCALING) if scale else 1.0  # one factor for all axes
    affine = create_affine_matrix_3d(angles, [factor] * 3)

    def per_channel(p_transform: float, draw, p_channel: float = 1.0):
        on = rng.uniform() < p_transform
        flags = [on and rng.uniform() < p_channel for _ in range(channels)]
        return flags, [draw() if flag else None for flag in flags]

    noise_on = rng.uniform() < P_NOISE
    noise_std = rng.uniform(*NOISE_STD) if noise_on else 0.0
    blur, blur_sigmas = per_channel(P_BLUR, lambda: [rng.uniform(*BLUR_SIGMA) for _ in range(3)],
                                    P_BLUR_CHANNEL)
    brightness, multipliers = per_channel(P_BRIGHTNESS,
                                          lambda: _contrast_factor(rng, *BRIGHTNESS))
    contrast, contrasts = per_channel(P_CONTRAST, lambda: _contrast_factor(rng, *CONTRAST))
    lowres, lowres_scales = per_channel(P_LOWRES, lambda: rng.uniform(*LOWRES_SCALE),
                                        P_LOWRES_CHANNEL)
    inverted, inverted_gammas = per_channel(P_GAMMA_INVERTED,
                                            lambda: _contrast_factor(rng, *GAMMA))
    gamma, gammas = per_channel(P_GAMMA, lambda: _contrast_factor(rng, *GAMMA))
    mirror = [rng.uniform() < P_MIRROR for _ in range(3)]

    def values(flags, drawn, neutral):
        return torch.tensor([v if f else neutral for f, v in zip(flags, drawn, strict=True)],
                            dtype=torch.float32)

    kernels = np.zeros((channels, 3, KERNEL_SIZE))
    for c, sigmas in enumerate(blur_sigmas):
        if sigmas is not None:
            kernels[c] = [blur_kernel(s) for s in sigmas]
    return {
        "spatial": torch.tensor(rotate or scale),
        "affine": torch.as_tensor(affine, dtype=torch.float32),
        "noise_std": torch.tensor(noise_std, dtype=torch.float32),
        "blur": torch.tensor(blur),
        "blur_sigma": torch.tensor([s if s is not None else [0.0] * 3 for s in blur_sigmas],
                                   dtype=torch.float32),
        "blur_kernel": torch.as_tensor(kernels, dtype=torch.float32),
        "brightness": values(brightness, multipliers, 1.0),
        "contrast": torch.tensor(contrast),
        "contrast_factor": values(contrast, contrasts, 1.0),
        "lowres": torch.tensor(lowres),
        "lowres_scale": values(lowres, lowres_scales, 1.0),
        "gamma_inverted": torch.tensor(inverted),
        "gamma_inverted_value": values(inverted, inverted_gammas, 1.0),
        "gamma": torch.tensor(gamma),
        "gamma_value": values(gamma, gammas, 1.0),
        "mirror": torch.tensor(mirror),
    }


class DeviceAugmenter:
    """nnU-Net's chain on a batch (B, C, *input_size) and its labels (B, 1, *input_size),
    with each sample's parameters from `draw_parameters` (collated); returns the final
    patch size."""

    def __init__(self, patch_size: Sequence[int], label_values: Sequence[int]) -> None:
        """LABEL_VALUES: every label the maps may hold (known, so the device is not asked)."""
        self.patch_size = tuple(int(p) for p in patch_size)
        self.input_size = input_size(self.patch_size)
        self.label_values = sorted({*(int(v) for v in label_values), PAD_LABEL})

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 parameters: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """PARAMETERS on the host (read there without waiting for the device) or on it."""
        device = image.device
        on_device = {k: v.to(device, non_blocking=True) for k, v in parameters.items()}
        with full_precision(image):
            image, label = self.spatial(image.float(), label, parameters, on_device)
            if bool(parameters["noise_std"].any()):
                std = on_device["noise_std"].view(-1, 1, 1, 1, 1)
                image = image + std * torch.randn_like(image)
            if bool(parameters["blur"].any()):
                image = self.blur(image, on_device)
            image = image * on_device["brightness"][..., None, None, None]
            image = self.contrast(image, on_device)
            image = self.low_resolution(image, parameters)
            image = self.gamma(image, on_device["gamma_inverted"],
                               on_device["gamma_inverted_value"], invert=True)
            image = self.gamma(image, on_device["gamma"], on_device["gamma_value"],
                               invert=False)
            image, label = self.mirror(image, label, on_device["mirror"])
        label = torch.where(label == PAD_LABEL, 0, label)
        return image.contiguous(), label.contiguous()

    # ------------------------------------------------------------------ spatial

    def grid(self, affine: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """batchgeneratorsv2's sampling grid for each sample's AFFINE (B, 3, 3): the final
        patch's centred pixel grid, mapped by the affine about the input's centre, in
        grid_sample's (x, y, z) = (axis 2, 1, 0) order, `align_corners=False`."""
        axes = [torch.linspace((1 - p) / 2, (p - 1) / 2, p, device=affine.device)
                for p in self.patch_size]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*P, 3)
        points = base.reshape(1, -1, 3) @ affine.transpose(1, 2)  # (B, N, 3)
        points = points / torch.tensor([s / 2 for s in shape], device=affine.device)
        return points.flip(-1).reshape(len(affine), *self.patch_size, 3)

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """The final patch from the centre, as `crop_tensor` cuts it (start at
        floor(shape / 2) - patch // 2)."""
        starts = [s // 2 - p // 2 for s, p in zip(tensor.shape[2:], self.patch_size, strict=True)]
        return tensor[(slice(None), slice(None),
                       *(slice(a, a + p) for a, p in zip(starts, self.patch_size, strict=True)))]

    def spatial(self, image: torch.Tensor, label: torch.Tensor,
                host: dict[str, torch.Tensor], device: dict[str, torch.Tensor]):
        moved = host["spatial"].nonzero().flatten().tolist()  # host values: no device wait
        image_out, label_out = self.crop(image).clone(), self.crop(label).clone()
        if not moved:
            return image_out, label_out
        index = torch.tensor(moved, device=image.device)
        grid = self.grid(device["affine"][index], image.shape[2:])
        image_out[index] = F.grid_sample(image[index], grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=False)
        label_out[index] = self.labels(label[index], grid)
        return image_out, label_out

    def labels(self, label: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Label maps through GRID as batchgeneratorsv2 resamples them: each label's
        indicator interpolated (x 1000, float16), the largest score wins, the nearest
        neighbour's label where it ties the winner; outside the box the label -1 (its
        indicator is 1 there: (indicator - 1) sampled with zero padding, plus 1)."""
        def sample(volume: torch.Tensor, mode: str) -> torch.Tensor:
            return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros",
                                 align_corners=False)

        nearest = (sample(label.float() - PAD_LABEL, "nearest") + PAD_LABEL).to(label.dtype)
        best = winner = nearest_score = None
        for value in self.label_values:
            indicator = (label == value).float()
            if value == PAD_LABEL:
                score = (sample((indicator - 1) * SCORE_SCALE, "bilinear") + SCORE_SCALE).half()
            else:
                score = sample(indicator * SCORE_SCALE, "bilinear").half()
            if best is None:
                best = score
                winner = torch.full(score.shape, value, dtype=label.dtype, device=label.device)
                nearest_score = torch.where(nearest == value, score, -math.inf)
                continue
            winner = torch.where(score > best, value, winner)  # ties: the earlier label
            best = torch.maximum(best, score)
            nearest_score = torch.where(nearest == value, score, nearest_score)
        return torch.where(nearest_score == best, nearest, winner)

    # ------------------------------------------------------------------ intensity

    def blur(self, image: torch.Tensor, device: dict[str, torch.Tensor]) -> torch.Tensor:
        """Separable Gaussian blur of the chosen (sample, channel) rows, each with its own
        sigma per axis: one grouped convolution per axis (reflect padding)."""
        batch, channels = image.shape[:2]
        rows = image.reshape(1, batch * channels, *image.shape[2:])
        kernels = device["blur_kernel"].reshape(batch * channels, 3, KERNEL_SIZE)
        blurred = rows
        half = KERNEL_SIZE // 2
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = KERNEL_SIZE
            padding = [0] * 6
            padding[4 - 2 * axis:6 - 2 * axis] = [half, half]
            blurred = F.conv3d(F.pad(blurred, padding, mode="reflect"),
                               kernels[:, axis].reshape(-1, 1, *shape), groups=len(kernels))
        chosen = device["blur"].reshape(1, -1, 1, 1, 1)
        return torch.where(chosen, blurred, rows).reshape(image.shape)

    def contrast(self, image: torch.Tensor, device: dict[str, torch.Tensor]) -> torch.Tensor:
        """(x - mean) * factor + mean, kept within the channel's range."""
        flat = image.flatten(2)
        mean = flat.mean(2)[..., None, None, None]
        low, high = (v[..., None, None, None] for v in flat.aminmax(dim=2))
        factor = device["contrast_factor"][..., None, None, None]
        changed = torch.minimum(torch.maximum((image - mean) * factor + mean, low), high)
        return torch.where(device["contrast"][..., None, None, None], changed, image)

    def low_resolution(self, image: torch.Tensor, host: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each chosen channel downsampled (nearest-exact) by its scale and back
        (trilinear); the sizes differ per sample, so one at a time."""
        shape = tuple(image.shape[2:])
        chosen = host["lowres"].nonzero().tolist()
        if not chosen:
            return image
        image = image.clone()
        for b, c in chosen:
            scale = float(host["lowres_scale"][b, c])
            small = F.interpolate(image[b:b + 1, c:c + 1], [round(n * scale) for n in shape],
                                  mode="nearest-exact")
            image[b, c] = F.interpolate(small, shape, mode="trilinear")[0, 0]
        return image

    def gamma(self, image: torch.Tensor, chosen: torch.Tensor, gamma: torch.Tensor,
              invert: bool) -> torch.Tensor:
        """x -> ((x - min) / range)^gamma * range + min, mean and spread kept (on the
        negated image where INVERT)."""
        sign = -1.0 if invert else 1.0
        x = image * sign
        flat = x.flatten(2)
        mean, std = flat.mean(2), flat.std(2)
        low, high = flat.aminmax(dim=2)
        spread = high - low
        expand = (..., None, None, None)
        x = ((x - low[expand]) / spread.clamp(min=EPS)[expand]).pow(gamma[expand])
        x = x * spread[expand] + low[expand]
        flat = x.flatten(2)
        mean_now, std_now = flat.mean(2), flat.std(2)
        x = (x - mean_now[expand]) * (std / std_now.clamp(min=EPS))[expand] + mean[expand]
        return torch.where(chosen[expand], x * sign, image)

    @staticmethod
    def mirror(image: torch.Tensor, label: torch.Tensor, axes: torch.Tensor):
        """Each sample flipped along its chosen axes."""
        for axis in range(3):
            flip = axes[:, axis].view(-1, 1, 1, 1, 1)
            image = torch.where(flip, image.flip(axis + 2), image)
            label = torch.where(flip, label.flip(axis + 2), label)
        return image, label
