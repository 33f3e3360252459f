"""A dataset unlike the demo's, written as a user's own would be: abdominal CT phantoms.

Nothing here comes from medpipe (SimpleITK writes the files), so a test that runs the
workflow on it checks what a stranger's dataset meets: Hounsfield units (`CT`
normalisation), MetaImage files, anisotropic voxels (1.5 x 1.5 x 5 mm, nnU-Net's
anisotropy rule), a tilted, flipped frame, a different shape for every case, and a class
(the lesion) that some cases do not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}


def _ellipsoid(points: np.ndarray, centre, radii) -> np.ndarray:
    return (((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def ct_phantom(rng: np.random.Generator, lesion: bool) -> tuple[sitk.Image, sitk.Image]:
    """One case: body, fat, spine, liver, two kidneys and maybe a lesion, in HU, with noise."""
    spacing = np.array([1.5, 1.5, 5.0])
    shape = np.array([rng.integers(76, 88), rng.integers(60, 70), rng.integers(18, 24)])
    # physical coordinates (mm) about the volume's centre, axes (x, y, z) = array (i, j, k)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    jitter = lambda scale: rng.uniform(-scale, scale, 3)  # noqa: E731
    body_radii = np.array([55.0, 42.0, 80.0]) * rng.uniform(0.9, 1.05, 3)
    hu = np.full(tuple(shape), -1000.0)
    labels = np.zeros(tuple(shape), np.uint8)
    body = _ellipsoid(points, jitter(3), body_radii)
    hu[body] = -100.0  # fat
    hu[_ellipsoid(points, jitter(3), body_radii - [8, 8, 0])] = 40.0  # muscle, organs
    hu[_ellipsoid(points, np.array([0.0, -28.0, 0.0]) + jitter(2), [8, 8, 90])] = 700.0  # spine
    liver_centre = np.array([-18.0, 5.0, 5.0]) + jitter(5)
    liver_radii = np.array([24.0, 20.0, 30.0]) * rng.uniform(0.85, 1.15, 3)
    liver = _ellipsoid(points, liver_centre, liver_radii)
    hu[liver], labels[liver] = 60.0, 1
    for side in (-1, 1):
        kidney = _ellipsoid(points, np.array([side * 26.0, -18.0, -10.0]) + jitter(3),
                            np.array([7.0, 9.0, 16.0]) * rng.uniform(0.85, 1.15, 3))
        hu[kidney], labels[kidney] = 160.0, 2
    if lesion:
        spot = _ellipsoid(points, liver_centre + jitter(8), rng.uniform(6.0, 10.0, 3))
        spot &= liver
        hu[spot], labels[spot] = 10.0, 3
    hu += rng.normal(0.0, 15.0, hu.shape)
    tilt = np.deg2rad(rng.uniform(3.0, 8.0))  # a gantry tilt about x, and y flipped
    direction = np.array([[1, 0, 0],
                          [0, -np.cos(tilt), -np.sin(tilt)],
                          [0, -np.sin(tilt), np.cos(tilt)]])
    origin = rng.uniform(-200.0, 200.0, 3)
    out = []
    for array in (np.round(hu).astype(np.int16), labels):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
        image.SetOrigin(tuple(float(v) for v in origin))
        out.append(image)
    return out[0], out[1]


def write_ct_dataset(root: Path, cases: int, test_cases: int, seed: int = 0) -> Path:
    """ROOT in the nnU-Net v2 raw layout (`.mha`, one CT channel); a third of the cases
    have no lesion."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(cases + test_cases):
        split = "Tr" if index < cases else "Ts"
        case = f"abdomen_{index:03d}"
        image, label = ct_phantom(rng, lesion=index % 3 != 2)
        sitk.WriteImage(image, str(root / f"images{split}" / f"{case}_0000.mha"), True)
        sitk.WriteImage(label, str(root / f"labels{split}" / f"{case}.mha"), True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "AbdomenPhantom", "channel_names": {"0": "CT"}, "labels": LABELS,
        "numTraining": cases, "file_ending": ".mha"}, indent=2))
    return root
