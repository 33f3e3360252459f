"""The classical baseline: SimpleITK affine (centred initialiser, Mattes mutual information)
followed by a B-spline free-form deformation, as a registration practitioner would set it up.

Fields follow ITK's convention: a displacement field on the fixed image's grid whose vector
at a fixed physical point p (mm, LPS) points to where p lies in the moving image,
p + d(p). `ddf_in_voxels` converts it to medpipe's `ddf` (voxels of the fixed grid, channel
per array axis) for the Jacobian metrics shared with the networks.

Status: the plumbing and the field convention are tested; the default settings are not yet
tuned (at 6 mm the affine stage stops after ~10 iterations on its convergence window) —
tuning them on the 3 mm demo belongs to the registration issue's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from medpipe.io import Volume, from_sitk, to_sitk


@dataclass(frozen=True)
class ClassicalSettings:
    deformable: Literal["bspline", "none"] = "bspline"
    histogram_bins: int = 32
    sampling_fraction: float = 0.2  # of the fixed voxels, random (seeded) per iteration
    affine_iterations: int = 200
    bspline_iterations: int = 100
    bspline_mesh_mm: float = 40.0  # control point spacing
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)  # voxels
    seed: int = 0


def _method(settings: ClassicalSettings, iterations: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=iterations, convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def register_classical(
    fixed: Volume, moving: Volume, settings: ClassicalSettings = ClassicalSettings()
) -> sitk.Transform:
    """The transform mapping fixed physical points into the moving image (ITK's direction)."""
    fixed_image = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    moving_image = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.GEOMETRY,
    )
    affine = _method(settings, settings.affine_iterations)
    affine.SetInitialTransform(initial, inPlace=False)
    affine_transform = affine.Execute(fixed_image, moving_image)
    if settings.deformable == "none":
        return affine_transform

    physical = np.asarray(fixed_image.GetSize()) * np.asarray(fixed_image.GetSpacing())
    mesh = [max(1, round(extent / settings.bspline_mesh_mm)) for extent in physical]
    bspline = sitk.BSplineTransformInitializer(fixed_image, mesh, order=3)
    deformable = _method(settings, settings.bspline_iterations)
    deformable.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                                    numberOfIterations=settings.bspline_iterations)
    deformable.SetMovingInitialTransform(affine_transform)
    deformable.SetInitialTransform(bspline, inPlace=True)
    deformable.Execute(fixed_image, moving_image)
    return sitk.CompositeTransform([affine_transform, bspline])


def displacement_field(transform: sitk.Transform, fixed: Volume) -> sitk.Image:
    """ITK displacement field (mm, LPS) on the fixed grid: the transform, sampled."""
    reference = to_sitk(fixed.with_array(np.zeros(fixed.shape[:3], np.float32)))
    return sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(),
    )


def ddf_in_voxels(field: sitk.Image) -> np.ndarray:
    """medpipe's ddf (3, X, Y, Z) in fixed-grid voxels from an ITK field in mm (LPS)."""
    vectors = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)  # (X, Y, Z, 3) in mm
    direction = np.asarray(field.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(field.GetSpacing()))
    return np.moveaxis(vectors @ to_index.T, -1, 0)


def warp_volume(moving: Volume, transform: sitk.Transform, fixed: Volume,
                labels: bool = False) -> Volume:
    """MOVING resampled onto FIXED's grid through TRANSFORM (nearest neighbour for labels)."""
    reference = to_sitk(fixed.with_array(np.zeros(fixed.shape[:3], np.float32)))
    warped = sitk.Resample(
        to_sitk(moving), reference, transform,
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
    )
    return from_sitk(warped)
