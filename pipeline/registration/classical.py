"""Classical SimpleITK registration: the baseline learned registration is compared against.

`register_sitk(fixed, moving, kind)` runs an affine registration (Mattes mutual information, three resolution
levels, seeded random sampling, so it works across modalities and is reproducible), optionally followed by a
B-spline free-form deformation (sampled Mattes MI, LBFGSB) or diffeomorphic demons (mono-modal: the moving image
is histogram-matched to the fixed one). Labels follow with `warp_labels` (nearest neighbour).
The returned transform maps fixed physical points (LPS mm) to moving ones, as every ITK transform does.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import SimpleITK as sitk

from datasets.volume import FewscanError, Volume
from datasets.world import from_sitk, to_sitk
from pipeline.registration.deformation import resample_to

Kind = Literal["affine", "affine+bspline", "affine+demons"]
KINDS: tuple[str, ...] = ("affine", "affine+bspline", "affine+demons")


def _normalise(img: sitk.Image) -> sitk.Image:
    """Zero-mean unit-variance float image (makes step sizes comparable across CT HU and MR units)."""
    return sitk.Cast(sitk.Normalize(sitk.Cast(img, sitk.sitkFloat32)), sitk.sitkFloat32)


def _sampling_seed(seed: int) -> int:
    """SimpleITK's seed for the random metric sampling: never 0, which SimpleITK reads as "seed from the wall clock"
    (`sitk.sitkWallClock`), so seed 0 made every run sample different voxels."""
    return seed + 1


def affine_sitk(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, iterations: int = 100) -> sitk.Transform:
    """Multi-resolution affine registration (Mattes MI); returns the fixed->moving `AffineTransform`."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, _sampling_seed(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def bspline_sitk(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, seed: int = 0,
                 grid_mm: float = 20.0, iterations: int = 50) -> sitk.Transform:
    """B-spline FFD on top of `initial` (control points about every `grid_mm`); returns the composite transform."""
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / grid_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, _sampling_seed(seed))  # full sampling is ~100 s per pair (NOTES.md)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * iterations)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetMovingInitialTransform(initial)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    # ITK applies a composite's transforms last-added first: fixed point -> B-spline -> affine -> moving.
    return sitk.CompositeTransform([initial, bspline])


def demons_sitk(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, iterations: int = 50,
                sigma: float = 1.0) -> sitk.Transform:
    """Diffeomorphic demons on the affinely pre-aligned, histogram-matched moving image; returns the composite."""
    aligned = sitk.Resample(moving, fixed, initial, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    aligned = sitk.HistogramMatching(aligned, fixed, numberOfHistogramLevels=256, numberOfMatchPoints=7,
                                     thresholdAtMeanIntensity=True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(sigma)
    field = demons.Execute(fixed, aligned)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([initial, disp])


def register_sitk(fixed: Volume, moving: Volume, kind: Kind = "affine+bspline",
                  seed: int = 0) -> tuple[Volume, sitk.Transform, float]:
    """Register `moving` to `fixed` with SimpleITK.

    Args:
        fixed: target volume `(I, J, K)` with RAS affine.
        moving: volume `(I', J', K')` on any grid; only world coordinates matter.
        kind: `affine`, `affine+bspline` or `affine+demons`.
        seed: metric sampling seed (same seed, same result).

    Returns:
        The moving image resampled on the fixed grid (linear, 0 outside), the fixed->moving transform and the
        wall-clock seconds the registration took.
    """
    if kind not in KINDS:
        raise FewscanError(f"unknown SimpleITK registration kind {kind!r} (known: {list(KINDS)})")
    start = time.perf_counter()
    f, m = _normalise(to_sitk(fixed)), _normalise(to_sitk(moving))
    transform = affine_sitk(f, m, seed=seed)
    if kind == "affine+bspline":
        transform = bspline_sitk(f, m, transform, seed=seed)
    elif kind == "affine+demons":
        transform = demons_sitk(f, m, transform)
    seconds = time.perf_counter() - start
    warped = from_sitk(sitk.Resample(to_sitk(moving), to_sitk(fixed), transform, sitk.sitkLinear, 0.0,
                                     sitk.sitkFloat32), moving.meta)
    return warped, transform, seconds


def warp_labels(labels: Volume, fixed: Volume, transform: sitk.Transform) -> Volume:
    """Carry a moving label map onto the fixed grid through `transform`, nearest neighbour (labels stay integers)."""
    return resample_to(labels, fixed, nearest=True, transform=transform)
