"""A brain tissue dataset built from real anatomy that ships with nilearn (no download).

Source: the MNI ICBM152 2009 symmetric T1 template with its grey- and white-matter
probability maps (1 mm, skull-stripped). Labels are 1 CSF (brain mask not claimed by grey or
white matter), 2 grey matter, 3 white matter, by the largest tissue probability.

Each case is the template seen through a different random "subject": a small affine and a
smooth B-spline deformation (control points 40 mm apart, a few mm of displacement, so the
map stays invertible), a multiplicative bias field, a gamma contrast change, an intensity
scale, and Rician noise. Cases are resampled straight from 1 mm to the demo spacing after an
anti-aliasing blur. Everything is drawn from `numpy.random.default_rng([seed, index])`, so a
case depends only on the seed and its index, and reruns write identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medpipe.data.layout import DATASET_JSON, UNLABELLED_DIR
from medpipe.errors import DatasetError
from medpipe.io import Volume, atomic_folder, from_sitk, read_image, write_image, write_json

DEMO_NAME = "medpipe-demo-brain"
LABELS = {"background": 0, "CSF": 1, "grey_matter": 2, "white_matter": 3}
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class DemoSettings:
    cases: int = 12
    test_cases: int = 2
    unlabelled: int = 0  # extra training scans written without labels (imagesTrUnlabelled)
    spacing: tuple[float, float, float] | float = 3.0  # mm; a triplet makes anisotropic data
    seed: int = 0
    bspline_coefficient_std_mm: float = 4.0  # std of the random B-spline coefficients
    max_rotation_deg: float = 6.0
    max_scaling: float = 0.06
    bias_strength: float = 0.25  # std of the log bias field's polynomial coefficients
    noise_fraction: tuple[float, float] = (0.01, 0.04)  # of the intensity scale


def build_demo_dataset(
    out_dir: str | Path,
    settings: DemoSettings,
    on_case_written: Callable[[str], None] | None = None,
) -> Path:
    """Write the demo dataset in the nnU-Net v2 layout, replacing only an earlier demo."""
    out_dir = Path(out_dir)
    _refuse_foreign_folder(out_dir)
    if settings.cases < 2:
        raise DatasetError(f"need at least 2 training cases, got {settings.cases}")
    spacing = np.broadcast_to(np.asarray(settings.spacing, dtype=float), (3,))
    if np.any(spacing <= 0):
        raise DatasetError(f"spacing must be positive, got {settings.spacing}")
    template = load_template(blur_mm=tuple(np.maximum(0.0, (spacing - 1.0) / 2.0)))
    grid = _output_grid(template["t1"], spacing)
    with atomic_folder(out_dir) as staging:
        # case numbers run on across the splits, so adding unlabelled scans changes no case
        labelled = settings.cases + settings.test_cases
        for index in range(labelled + settings.unlabelled):
            split = (("imagesTr", "labelsTr") if index < settings.cases
                     else ("imagesTs", "labelsTs") if index < labelled
                     else (UNLABELLED_DIR, None))
            image, label = make_demo_case(template, grid, settings, index)
            case_id = f"brain_{index:03d}"
            write_image(image, staging / split[0] / f"{case_id}_0000.nii.gz")
            if split[1] is not None:
                write_image(label, staging / split[1] / f"{case_id}.nii.gz")
            if on_case_written:
                on_case_written(case_id)
        write_json(_dataset_json(settings), staging / DATASET_JSON)
        write_preview(staging, staging / "preview.png")
    return out_dir


def load_template(blur_mm: float | tuple[float, ...] = 0.0) -> dict[str, sitk.Image]:
    """T1 (0..1) and tissue probabilities (0..1) at 1 mm, as float32 ITK images.

    `blur_mm` is the Gaussian anti-aliasing sigma for the later downsampling; it is applied
    here once rather than to every warped case (blurring commutes closely enough with the
    small, smooth demo deformations).
    """
    folder = files("nilearn.datasets") / "data"
    images = {}
    for key in ("t1", "gm", "wm"):
        path = folder / _TEMPLATE.format(key)
        if not path.is_file():
            raise DatasetError(f"nilearn does not ship {path.name}; reinstall nilearn", path)
        images[key] = sitk.Cast(
            sitk.ReadImage(str(path), sitk.sitkFloat32) / 255.0, sitk.sitkFloat32
        )
    brain = sitk.Cast(images["t1"] > 0, sitk.sitkFloat32)
    images["csf"] = sitk.Clamp(brain - images["gm"] - images["wm"], lowerBound=0.0, upperBound=1.0)
    sigmas = [float(v) for v in np.broadcast_to(blur_mm, (3,))]
    if max(sigmas) > 0:
        sigmas = [max(v, 1e-3) for v in sigmas]  # ITK needs positive sigmas on every axis
        images = {k: sitk.SmoothingRecursiveGaussian(v, sigmas) for k, v in images.items()}
    return images


def make_demo_case(
    template: dict[str, sitk.Image], grid: sitk.Image, settings: DemoSettings, index: int
) -> tuple[Volume, Volume]:
    """One (image, label) pair of Volumes on `grid` for case number `index`."""
    rng = np.random.default_rng([settings.seed, index])
    # evaluated once on the grid as a displacement field, then looked up for each of the four
    # images: bit for bit the files of four B-spline passes (checked), in 1/2.5 of the time
    transform = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        _random_transform(template["t1"], settings, rng), sitk.sitkVectorFloat64,
        grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection()))

    def warp(image: sitk.Image) -> np.ndarray:
        warped = sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return from_sitk(warped).array

    t1 = warp(template["t1"])
    tissues = np.stack([warp(template[k]) for k in ("csf", "gm", "wm")])
    in_brain = tissues.sum(axis=0) > 0.5
    label = np.where(in_brain, tissues.argmax(axis=0) + 1, 0).astype(np.uint8)

    intensity = t1 * _bias_field(t1.shape, settings.bias_strength, rng)
    intensity = np.clip(intensity, 0, None) ** rng.uniform(0.7, 1.4)
    scale = rng.uniform(400.0, 1200.0)
    sigma_noise = rng.uniform(*settings.noise_fraction) * scale
    real = intensity * scale + rng.normal(0.0, sigma_noise, t1.shape)
    imaginary = rng.normal(0.0, sigma_noise, t1.shape)
    image = np.sqrt(real**2 + imaginary**2).astype(np.float32)  # Rician, as in magnitude MRI

    geometry = from_sitk(grid).geometry
    return Volume(image, geometry), Volume(label, geometry)


def _random_transform(
    reference: sitk.Image, settings: DemoSettings, rng: np.random.Generator
) -> sitk.Transform:
    """Output-to-template map: small affine about the centre, then a smooth B-spline."""
    centre = reference.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in reference.GetSize()]
    )
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * settings.max_rotation_deg)
    rotation = sitk.Euler3DTransform(centre, *angles).GetMatrix()
    scaling = np.diag(1.0 + rng.uniform(-1, 1, 3) * settings.max_scaling)
    affine.SetMatrix((np.asarray(rotation).reshape(3, 3) @ scaling).ravel().tolist())
    affine.SetTranslation(rng.normal(0.0, 2.0, 3).tolist())

    mesh = [
        max(1, round(s * sp / 40.0))
        for s, sp in zip(reference.GetSize(), reference.GetSpacing(), strict=True)
    ]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    n = len(bspline.GetParameters())
    bspline.SetParameters(rng.normal(0.0, settings.bspline_coefficient_std_mm, n).tolist())
    return sitk.CompositeTransform([affine, bspline])


def _bias_field(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """exp of a random 2nd-order polynomial over [-1, 1]^3: a smooth, positive gain field."""
    axes = list(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    terms = [np.ones(shape)] + axes + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    coefficients = rng.normal(0.0, strength, len(terms))
    coefficients[0] = 0.0
    return np.exp(sum(c * t for c, t in zip(coefficients, terms, strict=True)))


def _output_grid(reference: sitk.Image, spacing: np.ndarray) -> sitk.Image:
    """A grid of `spacing` mm covering the template's field of view, same orientation."""
    old_spacing = np.asarray(reference.GetSpacing())
    extent = np.asarray(reference.GetSize()) * old_spacing
    size = np.maximum(1, np.round(extent / spacing)).astype(int)
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    first_corner = np.asarray(reference.GetOrigin()) - direction @ (old_spacing / 2)
    origin = first_corner + direction @ (spacing / 2)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(reference.GetDirection())
    return grid


def _dataset_json(settings: DemoSettings) -> dict[str, object]:
    return {
        "name": DEMO_NAME,
        "description": (
            "Brain tissue segmentation demo built from the MNI ICBM152 2009 symmetric template "
            "with random deformations, bias fields, contrast changes and Rician noise."
        ),
        "reference": "Fonov et al., NeuroImage 2011; Fonov et al., NeuroImage 2009 (ICBM152).",
        "licence": "MNI ICBM152 2009 template: copyright McConnell Brain Imaging Centre, "
        "free use with attribution.",
        "channel_names": {"0": "T1"},
        "labels": LABELS,
        "numTraining": settings.cases,
        "file_ending": ".nii.gz",
        "medpipe_demo": {
            "seed": settings.seed,
            "spacing_mm": np.broadcast_to(settings.spacing, (3,)).tolist(),
            "test_cases": settings.test_cases,
        },
    }


def write_preview(dataset_dir: Path, out_png: Path, max_cases: int = 4) -> Path:
    """Mid slices (axial, coronal, sagittal) of a few cases with label overlays."""
    import matplotlib.pyplot as plt

    from medpipe.figures import save_figure, show_slice

    labels = sorted((dataset_dir / "labelsTr").glob("*.nii.gz"))[:max_cases]
    fig, axes = plt.subplots(len(labels), 3, figsize=(9, 3 * len(labels)), squeeze=False)
    for row, label_path in zip(axes, labels, strict=True):
        case_id = label_path.name[: -len(".nii.gz")]
        image = read_image(dataset_dir / "imagesTr" / f"{case_id}_0000.nii.gz").array
        label = read_image(label_path).array
        centre = [n // 2 for n in image.shape]
        views = {
            "axial": (image[:, :, centre[2]], label[:, :, centre[2]]),
            "coronal": (image[:, centre[1], :], label[:, centre[1], :]),
            "sagittal": (image[centre[0], :, :], label[centre[0], :, :]),
        }
        for ax, (view, (img, lab)) in zip(row, views.items(), strict=True):
            show_slice(ax, img, lab, len(LABELS), f"{case_id} {view}")
    fig.tight_layout()
    return save_figure(fig, out_png)


def _refuse_foreign_folder(out_dir: Path) -> None:
    """Never overwrite a folder that holds anything but an earlier demo dataset."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    marker = out_dir / DATASET_JSON
    try:
        is_demo = json.loads(marker.read_text()).get("name") == DEMO_NAME
    except (OSError, ValueError, AttributeError):
        is_demo = False
    if not is_demo:
        raise DatasetError(
            "exists and is not a medpipe demo dataset; choose an empty or new folder", out_dir
        )
