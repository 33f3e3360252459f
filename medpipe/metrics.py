"""Segmentation metrics on label maps with their true voxel spacing, and deformation metrics
(Jacobian determinant, folding, SDlogJ) of displacement fields.

HD95 comes from MONAI (`compute_hausdorff_distance` with `percentile=95` and the image
spacing, so distances are in mm); Dice and volumes are exact voxel counts. Conventions
follow nnU-Net / the Medical Segmentation Decathlon: a class absent from both reference and
prediction has Dice NaN (not 1), and HD95 is NaN when either mask is empty; averages skip
NaN and report how many cases counted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def hd95_mm(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric surface distance in mm between two boolean masks (MONAI).

    NaN when either mask is empty: a distance to nothing is undefined.
    """
    if not (prediction.any() and reference.any()):
        return math.nan
    with warnings.catch_warnings():  # MONAI warns about empty masks, handled above
        warnings.simplefilter("ignore")
        distance = compute_hausdorff_distance(
            torch.from_numpy(prediction)[None, None],
            torch.from_numpy(reference)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(distance.item())


def segmentation_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    classes: Mapping[str, int | Sequence[int]],
    spacing: Sequence[float],
) -> dict[str, dict[str, float]]:
    """Per class: dice, hd95 (mm), volumes (ml) and their difference (prediction - reference).

    PREDICTION and REFERENCE are label maps on the same grid of voxel SPACING (mm, array
    axis order); CLASSES maps a class name to its label value, or a region's name to the
    values it covers (background excluded). Dice is counted exactly in integers; one class
    at a time keeps memory at two boolean masks.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    result = {}
    for name, value in classes.items():
        if isinstance(value, int | np.integer):
            predicted, expected = prediction == value, reference == value
        else:  # a region: the union of its label values
            predicted, expected = np.isin(prediction, value), np.isin(reference, value)
        n_pred, n_ref = int(predicted.sum()), int(expected.sum())
        overlap = int(np.count_nonzero(predicted & expected))
        result[name] = {
            "dice": 2.0 * overlap / (n_pred + n_ref) if n_pred + n_ref else math.nan,
            "hd95": hd95_mm(predicted, expected, spacing),
            "volume_pred_ml": n_pred * voxel_ml,
            "volume_ref_ml": n_ref * voxel_ml,
            "volume_diff_ml": (n_pred - n_ref) * voxel_ml,
        }
    return result


def dice_per_class(
    prediction: torch.Tensor, reference: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """Dice of each foreground class for label tensors of the same shape (validation use).

    NaN where a class is in neither map, so a mean over classes/cases uses `nanmean`.
    """
    scores = []
    for value in range(1, n_classes):
        p, r = prediction == value, reference == value
        denominator = p.sum() + r.sum()
        overlap = 2.0 * (p & r).sum()
        scores.append(overlap / denominator if denominator else torch.tensor(math.nan))
    return torch.stack([s.double() for s in scores])


def dice_per_region(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Dice of each region for (R, ...) boolean masks (validation of region-based nets); NaN
    where a region is in neither."""
    scores = []
    for p, r in zip(prediction, reference, strict=True):
        denominator = p.sum() + r.sum()
        overlap = 2.0 * (p & r).sum()
        scores.append(overlap / denominator if denominator else torch.tensor(math.nan))
    return torch.stack([s.double() for s in scores])


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, std (population, like nnU-Net's summary), and how many values were not NaN."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


# --------------------------------------------------------------------------- deformations


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """det(I + grad u) per voxel of a displacement field u of shape (3, X, Y, Z) in voxels,
    channel c moving along array axis c (medpipe's `ddf` convention). Central differences
    inside, one-sided at the border (numpy's `gradient`). Voxel units make it independent
    of the spacing: mm displacements over mm distances give the same ratio."""
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"expected a (3, X, Y, Z) displacement field, got {ddf.shape}")
    grad = np.stack([np.stack(np.gradient(ddf[c].astype(np.float64)), 0) for c in range(3)])
    grad += np.eye(3)[:, :, None, None, None]  # d(x + u)/dx
    return np.linalg.det(np.moveaxis(grad, (0, 1), (-2, -1)))


def deformation_metrics(ddf: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding (% of voxels with det J <= 0) and SDlogJ (std of log det J, clipped to
    [1e-9, 1e9] so folded voxels count instead of vanishing), over MASK; and
    `sdlogj_learn2reg`, SDlogJ as the Learn2Reg evaluator computes it (labelled apart: it
    drops a 2-voxel border and takes std(log(clip(det J + 3))), the +3 being that
    evaluator's own; the two are not interchangeable)."""
    det = jacobian_determinant(ddf)
    inside = mask.astype(bool) if mask is not None else np.ones(det.shape, bool)
    values = det[inside]
    border = (slice(2, -2),) * 3
    learn2reg = det[border][inside[border]]
    return {
        "folding_percent": float(100.0 * np.mean(values <= 0)),
        "sdlogj": float(np.std(np.log(np.clip(values, 1e-9, 1e9)))),
        "sdlogj_learn2reg": float(np.std(np.log(np.clip(learn2reg + 3, 1e-9, 1e9))))
        if learn2reg.size else math.nan,
        "jacobian_min": float(values.min()),
        "jacobian_mean": float(values.mean()),
    }
