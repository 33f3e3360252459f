"""Registration pairs on one grid: the fixed image's preprocessed grid, padded.

Cases come from the segmentation preprocessing (cropped, normalised, resampled to the
plans' spacing), so a network sees intensities and voxel sizes prepared one way. For a pair,
the moving case is resampled onto the fixed case's grid through its affine pre-alignment
(or, without one, where it lies physically), and both are padded at the far end of each
axis to the run's common shape (a multiple of the network's divisor), so index 0 stays at
the fixed grid's origin and a predicted field restricted to the unpadded part lies exactly
on that grid.

Pre-alignment for training, VoxelMorph-style: every case is affinely registered once to a
reference case (SimpleITK, centred initialiser + affine, Mattes MI); a pair (moving m,
fixed f) then uses A_m o A_f^-1 (fixed -> reference -> moving), so n cases cost n affine
registrations, not n^2. The composition carries two registrations' errors (on the 3 mm demo
mean Dice 0.53 vs 0.63 for a direct pairwise affine), so evaluation and inference align
each pair directly; the network learns to correct the rougher training alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import center_of_mass

from medpipe.config import ClassicalSettings
from medpipe.errors import DatasetError
from medpipe.io import Geometry, Volume
from medpipe.preprocessing import load_labelled_cases, load_preprocessed, resized_geometry
from medpipe.sampling import EpochDataset
from medpipe.spatial import voxel_map_field, warp


@dataclass(frozen=True)
class RegistrationCase:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, normalised, on the preprocessed grid
    labels: np.ndarray | None  # (X, Y, Z) integer labels on the same grid; None: a new scan
    geometry: Geometry  # where the preprocessed grid lies

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])

    def volume(self, channel: int = 0) -> Volume:
        return Volume(self.image[channel], self.geometry)


def load_registration_cases(preprocessed_dir: str | Path, case_ids: Sequence[str],
                            labelled: bool = True) -> list[RegistrationCase]:
    """The preprocessed cases, each required to have labels; with LABELLED False (the
    unlabelled training scans) their labels, if any, are left out."""
    if labelled:
        return [RegistrationCase(case.case_id, case.data, case.seg,
                                 case.properties.preprocessed_geometry)
                for case in load_labelled_cases(preprocessed_dir, case_ids)]
    cases = [load_preprocessed(preprocessed_dir, case_id) for case_id in case_ids]
    return [RegistrationCase(case.case_id, case.data, None,
                             case.properties.preprocessed_geometry) for case in cases]


def resample_case(case: RegistrationCase, spacing: Sequence[float] | None) -> RegistrationCase:
    """CASE on a grid of SPACING (mm) covering the same region (the image by `resize_image`,
    labels by nearest neighbour); unchanged when SPACING is None or already the case's.

    The one resampling onto a network's grid, for training, evaluation and inference alike;
    in torch, since at inference it runs on the raw scan (a 1 mm brain to a 6 mm grid in
    tens of milliseconds, where scipy's spline prefilter alone took half a second)."""
    if spacing is None:
        return case
    before = case.shape
    after = tuple(max(1, round(n * s / t))
                  for n, s, t in zip(before, case.geometry.spacing, spacing, strict=True))
    if after == before:
        return case
    labels = case.labels
    if labels is not None:
        labels = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None],
                               size=after, mode="nearest-exact")[0, 0].numpy()
        labels = labels.astype(case.labels.dtype)
    return RegistrationCase(case.case_id, resize_image(case.image, after), labels,
                            resized_geometry(case.geometry, before, after))


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(C, X, Y, Z) float32 resized to SHAPE, outer voxel edges kept (as `resized_geometry`
    and scipy's `zoom(grid_mode=True)`): each output voxel the mean of the input voxels it
    covers along an axis that shrinks (torch's "area", an anti-aliasing box filter; at a
    factor of 2 exactly zoom's linear interpolation), linear along an axis that grows."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    shrunk = tuple(min(have, want) for have, want in zip(tensor.shape[2:], shape, strict=True))
    if shrunk != tuple(tensor.shape[2:]):
        tensor = F.adaptive_avg_pool3d(tensor, shrunk)
    if shrunk != tuple(shape):
        tensor = F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)
    return tensor[0].numpy()


def padded_shape(shapes: Sequence[Sequence[int]], divisor: Sequence[int]) -> tuple[int, ...]:
    """The smallest shape holding every case that the network's divisor divides."""
    largest = np.max(np.asarray(shapes), axis=0)
    divisor = np.asarray(divisor)
    return tuple(int(v) for v in -(-largest // divisor) * divisor)


def prealign(cases: Sequence[RegistrationCase], reference: RegistrationCase,
             settings: ClassicalSettings | None = None,
             mode: str = "affine") -> dict[str, list[list[float]]]:
    """Per case, the 4x4 LPS matrix taking reference points into the case (identity for
    the reference itself): a SimpleITK affine registration on the first channel (MODE
    "affine"), or the translation matching the centres of mass ("moments"). Run the affine
    at the preprocessed spacing: on a coarse grid its multi-resolution pyramid runs out of
    voxels (at 6 mm it made the demo pairs worse than no alignment)."""
    settings = settings or ClassicalSettings(deformable="none")
    matrices = {}
    for case in cases:
        if case.case_id == reference.case_id:
            matrix = np.eye(4)
        elif mode == "moments":
            matrix = moments_matrix(case, reference)
        else:  # SimpleITK, imported here only: training with moments never needs it
            from medpipe.registration.classical import register_classical
            from medpipe.registration.fields import affine_matrix

            matrix = affine_matrix(register_classical(reference.volume(), case.volume(),
                                                      settings))
        matrices[case.case_id] = matrix.tolist()
    return matrices


def centre_of_mass(case: RegistrationCase) -> np.ndarray:
    """The intensity-weighted centre of the first channel (LPS mm), the image shifted to
    start at 0 (normalised scans are negative in the background)."""
    image = case.image[0].astype(np.float64)
    index = np.asarray(center_of_mass(image - image.min()))
    return (case.geometry.affine_lps @ np.append(index, 1.0))[:3]


def moments_matrix(moving: RegistrationCase, fixed: RegistrationCase) -> np.ndarray:
    """Fixed points -> moving points: the translation that puts the fixed centre of mass
    on the moving one (ITK's MOMENTS initialiser, as a matrix); exact under composition, so
    per-case matrices to a reference give every pair's."""
    matrix = np.eye(4)
    matrix[:3, 3] = centre_of_mass(moving) - centre_of_mass(fixed)
    return matrix


def pair_matrix(matrices: dict[str, list] | None, moving: str, fixed: str) -> np.ndarray:
    """Fixed points -> moving points: A_moving o A_fixed^-1 (identity without matrices)."""
    if not matrices:
        return np.eye(4)
    return np.asarray(matrices[moving]) @ np.linalg.inv(np.asarray(matrices[fixed]))


def pair_arrays(moving: RegistrationCase, fixed: RegistrationCase, matrix: np.ndarray,
                shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Both images and (where both cases have them) label maps of a pair on the fixed
    case's grid padded to SHAPE (`padded_pair`, then `onto_fixed_grid`).

    Image padding (and moving-image points outside its own grid) take each image's
    minimum, the background of a normalised scan; labels take 0.
    """
    arrays = padded_pair(moving, fixed, matrix, shape)
    tensors = {name: torch.from_numpy(array)[None] for name, array in arrays.items()}
    moved = onto_fixed_grid(tensors["moving"], tensors.get("moving_labels"),
                            tensors.pop("voxel_map"))
    tensors["moving"], labels = moved
    if labels is not None:
        tensors["moving_labels"] = labels
    return {name: tensor[0].numpy() for name, tensor in tensors.items()}


def padded_pair(moving: RegistrationCase, fixed: RegistrationCase, matrix: np.ndarray,
                shape: Sequence[int]) -> dict[str, np.ndarray]:
    """A pair before resampling, every array padded to SHAPE: the moving image and labels
    still on the moving case's grid, and `voxel_map` (fixed voxel index -> moving voxel
    index, float32 4x4) that `onto_fixed_grid` applies. The loader sends this (a copy), the
    device resamples the whole batch at once."""
    shape = tuple(int(n) for n in shape)
    # fixed voxel index -> fixed physical point -> moving physical point -> moving index
    voxel_map = np.linalg.inv(moving.geometry.affine_lps) @ matrix @ fixed.geometry.affine_lps
    arrays = {"moving": _pad(moving.image, shape, per_channel_min=True),
              "fixed": _pad(fixed.image, shape, per_channel_min=True),
              "voxel_map": voxel_map.astype(np.float32)}
    if moving.labels is not None and fixed.labels is not None:
        arrays["moving_labels"] = _pad(moving.labels[None].astype(np.int64), shape)
        arrays["fixed_labels"] = _pad(fixed.labels[None].astype(np.int64), shape)
    return arrays


def onto_fixed_grid(moving: torch.Tensor, labels: torch.Tensor | None,
                    voxel_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of padded moving images (B, C, *S) and label maps (B, 1, *S) resampled onto
    their fixed grids through VOXEL_MAPS (B, 4, 4), trilinear and nearest-neighbour, in
    float32 (`spatial.warp`); points outside the moving grid take the image's minimum and
    label 0, as the padding does."""
    field = voxel_map_field(voxel_maps.to(moving.device), tuple(moving.shape[2:]))
    floor = moving.flatten(2).amin(dim=2)[..., None, None, None].float()
    moved = warp(moving.float() - floor, field) + floor
    if labels is not None:
        labels = warp(labels.float(), field, mode="nearest").round().to(labels.dtype)
    return moved, labels


def _pad(array: np.ndarray, shape: Sequence[int], per_channel_min: bool = False) -> np.ndarray:
    if any(have > want for have, want in zip(array.shape[1:], shape, strict=True)):
        raise DatasetError(f"case of shape {array.shape[1:]} does not fit the grid {shape}")
    out = np.empty((array.shape[0], *shape), dtype=array.dtype)
    for c, channel in enumerate(array):
        out[c] = channel.min() if per_channel_min else 0
        out[c][tuple(slice(0, n) for n in channel.shape)] = channel
    return out


def evaluation_pairs(case_ids: Sequence[str], atlas: str | None, limit: int) -> list[tuple]:
    """Held-out (moving, fixed) pairs, the first LIMIT in a fixed order: each case to the
    atlas, or every ordered pair of distinct cases taken round by round (each case to the
    next one, cyclically, then to the one after that, ...), so that LIMIT pairs use every
    case as evenly as they can: 20 pairs of 20 test cases move each case once and fix each
    once, where plain permutations would move the first case 19 times."""
    if atlas is not None:
        return [(case_id, atlas) for case_id in case_ids if case_id != atlas][:limit]
    n = len(case_ids)
    pairs = [(case_ids[i], case_ids[(i + offset) % n])
             for offset in range(1, n) for i in range(n)]
    return pairs[:limit]


class PairDataset(EpochDataset):
    """Random training pairs; like the segmentation patches, each is a pure function of
    (seed, epoch, index), so a resumed run replays them exactly.

    Cases without labels (unlabelled training scans) pair like the others: such a pair
    carries empty label maps and `labelled` False, so batches keep one layout and the loss
    leaves the pair out of its Dice term."""

    def __init__(self, cases: Sequence[RegistrationCase], matrices: dict[str, list] | None,
                 shape: Sequence[int], batch_size: int, iterations: int, seed: int,
                 atlas: RegistrationCase | None = None) -> None:
        movers = [c for c in cases if atlas is None or c.case_id != atlas.case_id]
        if len(movers) < (1 if atlas is not None else 2):
            raise DatasetError("registration needs at least two training cases (or an atlas "
                               "and one case)")
        self.cases = movers
        self.matrices = matrices
        self.shape = tuple(shape)
        self.batch_size = batch_size
        self.iterations = iterations
        self.seed = seed
        self.atlas = atlas

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.atlas is not None:
            moving, fixed = self.cases[rng.integers(len(self.cases))], self.atlas
        else:
            first, second = rng.choice(len(self.cases), size=2, replace=False)
            moving, fixed = self.cases[first], self.cases[second]
        matrix = pair_matrix(self.matrices, moving.case_id, fixed.case_id)
        arrays = padded_pair(moving, fixed, matrix, self.shape)  # resampled by the task
        labelled = "moving_labels" in arrays
        if not labelled:
            empty = np.zeros((1, *self.shape), dtype=np.int64)
            arrays |= {"moving_labels": empty, "fixed_labels": empty.copy()}
        return ({name: torch.from_numpy(array) for name, array in arrays.items()}
                | {"labelled": torch.tensor(labelled)})
