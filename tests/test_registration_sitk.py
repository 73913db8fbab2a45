"""SimpleITK baseline registration (the Volume <-> SimpleITK round trip: tests/test_world.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from datasets.volume import Volume
from datasets.world import LPS_TO_RAS, to_sitk
from pipeline.registration.classical import register_sitk, warp_labels


def blobs(shape: tuple[int, int, int] = (28, 28, 28), seed: int = 0) -> np.ndarray:
    """Smooth random blobs with structure at several scales (something registration can lock onto)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.5).astype(np.float32) * 10


def oblique_affine(spacing: float = 1.5) -> np.ndarray:
    """A rotated, anisotropic-ish RAS affine (exercises direction handling)."""
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([spacing, spacing, 2.0])
    aff[:3, 3] = [-20.0, 10.0, 5.0]
    return aff


def test_affine_registration_recovers_known_translation() -> None:
    fixed_arr = blobs()
    shift_vox = np.array([3.0, -2.0, 1.0])  # moving content sits 3, -2, 1 voxels further along I, J, K
    moving_arr = ndimage.shift(fixed_arr, shift_vox, order=1, mode="nearest")
    aff = oblique_affine()
    fixed, moving = Volume(fixed_arr, aff), Volume(moving_arr, aff)
    warped, transform, seconds = register_sitk(fixed, moving, "affine", seed=0)
    # the fixed->moving map displaces every point by the shift, in world (LPS) millimetres
    centre = np.asarray(to_sitk(fixed).TransformContinuousIndexToPhysicalPoint((14.0, 14.0, 14.0)))
    moved = np.asarray(transform.TransformPoint(centre.tolist()))
    expected = LPS_TO_RAS[:3, :3] @ aff[:3, :3] @ shift_vox
    np.testing.assert_allclose(moved - centre, expected, atol=0.5)
    inner = (slice(6, -6),) * 3
    err_before = np.abs(moving_arr - fixed_arr)[inner].mean()
    err_after = np.abs(warped.array - fixed_arr)[inner].mean()
    assert err_after < 0.2 * err_before
    assert seconds > 0


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_gives_the_same_registration(seed: int) -> None:
    """Seed 0 too: SimpleITK reads a sampling seed of 0 as "wall clock", which once made every atlas run differ."""
    fixed = Volume(blobs(), oblique_affine())
    moving = Volume(ndimage.shift(blobs(), [2.0, -1.0, 1.0], order=1, mode="nearest"), oblique_affine())
    params = [np.asarray(register_sitk(fixed, moving, "affine", seed=seed)[1].GetParameters()) for _ in range(2)]
    # equal up to the summation order of SimpleITK's threads (1e-12 here); other samples move them by ~1e-3
    np.testing.assert_allclose(params[0], params[1], rtol=0, atol=1e-8)
    other = np.asarray(register_sitk(fixed, moving, "affine", seed=seed + 1)[1].GetParameters())
    assert np.abs(other - params[0]).max() > 1e-6  # the seed does drive the sampling


def test_warp_labels_is_nearest_neighbour_and_follows_the_transform() -> None:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[4:8, 4:8, 4:8] = 3
    fixed = Volume(np.zeros((16, 16, 16), np.float32), aff)
    # fixed point p maps to p + (4 mm along LPS x) = 2 voxels further along I after the RAS flip of x
    transform = sitk.TranslationTransform(3, (-4.0, 0.0, 0.0))
    out = warp_labels(Volume(labels, aff), fixed, transform)
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, 3}
    np.testing.assert_array_equal(np.argwhere(out.array == 3).min(0), [2, 4, 4])


@pytest.mark.parametrize("kind", ["affine+demons", "affine+bspline"])
def test_deformable_kinds_do_not_undo_the_affine_gain(kind: str) -> None:
    fixed_arr = blobs((20, 20, 20), seed=1)
    moving_arr = ndimage.shift(fixed_arr, (2.0, 1.0, 0.0), order=1, mode="nearest")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    warped, _, _ = register_sitk(Volume(fixed_arr, aff), Volume(moving_arr, aff), kind)
    inner = (slice(4, -4),) * 3
    assert np.abs(warped.array - fixed_arr)[inner].mean() < 0.5 * np.abs(moving_arr - fixed_arr)[inner].mean()
