"""Displacement fields: warping, Jacobian determinants and ITK-compatible field files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from datasets.volume import Volume
from datasets.world import from_sitk, to_sitk
from pipeline.registration.deformation import (
    ddf_from_itk,
    ddf_to_itk,
    folding_ratio,
    jacobian_determinant,
    log_jacobian_std,
    read_displacement_field,
    transform_to_ddf,
    warp_array,
    write_displacement_field,
)


def smooth_image(shape: tuple[int, int, int] = (20, 22, 18), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)


def oblique_affine() -> np.ndarray:
    c, s = np.cos(0.4), np.sin(0.4)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([1.5, 2.0, 2.5])
    aff[:3, 3] = [12.0, -30.0, 7.0]
    return aff


def test_identity_field_leaves_image_unchanged() -> None:
    img = smooth_image()
    ddf = np.zeros((3, *img.shape), np.float32)
    np.testing.assert_allclose(warp_array(img, ddf), img, atol=1e-6)
    labels = (img > 0).astype(np.uint8) * 2
    np.testing.assert_array_equal(warp_array(labels, ddf, nearest=True), labels)
    jac = jacobian_determinant(ddf)
    np.testing.assert_allclose(jac, 1.0)
    assert folding_ratio(jac) == 0.0 and log_jacobian_std(jac) == 0.0


def test_integer_translation_field_shifts_the_image() -> None:
    img = smooth_image()
    ddf = np.zeros((3, *img.shape), np.float32)
    ddf[0], ddf[2] = 2.0, -1.0  # warped(x) = moving(x + (2, 0, -1))
    out = warp_array(img, ddf)
    np.testing.assert_allclose(out[:-2, :, 1:], img[2:, :, :-1], atol=1e-5)


def test_jacobian_determinant_of_analytic_fields() -> None:
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in (12, 13, 14)), indexing="ij")
    # linear field: phi = diag(1.1, 0.8, 1.0) x + shear 0.2 * k along i -> det = 1.1 * 0.8 * 1.0
    ddf = np.stack([0.1 * i + 0.2 * k, -0.2 * j, np.zeros_like(k)])
    np.testing.assert_allclose(jacobian_determinant(ddf), 0.88, atol=1e-9)
    # quadratic field u_i = a i^2: det = 1 + 2 a i, exact for central differences away from the borders
    a = 0.05
    ddf = np.stack([a * i**2, np.zeros_like(j), np.zeros_like(k)])
    jac = jacobian_determinant(ddf)
    np.testing.assert_allclose(jac[1:-1], (1 + 2 * a * i)[1:-1], atol=1e-9)
    # a fold: u_i = -1.5 i gives det = -0.5 everywhere
    folded = np.stack([-1.5 * i, np.zeros_like(j), np.zeros_like(k)])
    assert folding_ratio(jacobian_determinant(folded)) == 1.0


def test_itk_field_round_trip_is_lps_millimetres() -> None:
    aff = oblique_affine()
    fixed = Volume(smooth_image(), aff)
    ddf = np.zeros((3, *fixed.array.shape), np.float32)
    ddf[1] = 1.0  # one voxel along J
    field = ddf_to_itk(ddf, fixed)
    assert field.GetNumberOfComponentsPerPixel() == 3
    expected = np.diag([-1, -1, 1]) @ aff[:3, :3] @ [0, 1, 0]
    np.testing.assert_allclose(field[3, 4, 5], expected, atol=1e-9)
    np.testing.assert_allclose(ddf_from_itk(field, fixed), ddf, atol=1e-5)


def test_written_field_applied_by_simpleitk_matches_fewscan_warp(tmp_path: Path) -> None:
    aff = oblique_affine()
    moving_arr = smooth_image(seed=3)
    fixed = Volume(np.zeros_like(moving_arr), aff)
    moving = Volume(moving_arr, aff)
    # a smooth, non-trivial field (voxel units), small enough to stay inside the volume in the interior
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in moving_arr.shape), indexing="ij")
    ddf = np.stack([1.5 * np.sin(j / 4.0), 1.2 * np.cos(k / 5.0), 0.8 * np.sin(i / 3.0)]).astype(np.float32)
    path = tmp_path / "field.nii.gz"
    write_displacement_field(ddf, fixed, path)
    transform = read_displacement_field(path)
    by_sitk = from_sitk(sitk.Resample(to_sitk(moving), to_sitk(fixed), transform, sitk.sitkLinear, 0.0)).array
    ours = warp_array(moving_arr, ddf)
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(by_sitk[inner], ours[inner], atol=1e-4)
    # and a SimpleITK transform sampled back into a DDF is the same field
    np.testing.assert_allclose(transform_to_ddf(transform, fixed), ddf, atol=1e-4)


def test_scaling_and_squaring_keeps_a_large_deformation_invertible() -> None:
    """The integration `registration.diffeomorphic` uses (MONAI's DVF2DDF, as `RegistrationNet` does): a smooth
    stationary velocity field large enough to fold when used directly as a displacement gives, integrated, a
    field with det J > 0 at every interior voxel."""
    import torch
    from monai.networks.blocks import DVF2DDF

    from pipeline.common.config import RegistrationConfig

    n, amplitude = 24, 6.0  # voxels: compression of up to 6 * 2 pi / 23 = 1.6 > 1 folds the direct displacement
    i, j, k = (np.pi * a / (n - 1) for a in np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij"))
    velocity = amplitude * np.stack([np.sin(2 * i) * np.sin(j) * np.sin(k), np.sin(i) * np.sin(2 * j) * np.sin(k),
                                     np.sin(i) * np.sin(j) * np.sin(2 * k)]).astype(np.float32)
    interior = (slice(1, -1),) * 3  # central differences are one-sided on the border faces
    direct = jacobian_determinant(velocity)[interior]
    assert direct.min() < 0 and folding_ratio(direct) > 0.01
    steps = RegistrationConfig().integration_steps
    ddf = DVF2DDF(num_steps=steps)(torch.from_numpy(velocity)[None])[0].numpy()
    assert np.abs(ddf).max() > 5.0  # still a large deformation
    integrated = jacobian_determinant(ddf)[interior]
    assert integrated.min() > 0, integrated.min()
