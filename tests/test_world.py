"""RAS <-> LPS and Volume <-> SimpleITK (`datasets.world`): on oblique and flipped affines, against ITK's own
index-to-point maps and torchio's converters."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from torchio.data.io import get_ras_affine_from_sitk, sitk_to_nib

from datasets.volume import Volume
from datasets.volume_io import load_volume
from datasets.world import LPS_TO_RAS, from_sitk, lps_to_ras, sitk_ras_affine, to_sitk


def affines() -> list[np.ndarray]:
    """Every axis permutation with every flip (anisotropic), plus random oblique ones with mirrored directions."""
    rng = np.random.default_rng(0)
    out = []
    for perm, signs in itertools.product(itertools.permutations(range(3)), itertools.product([-1.0, 1.0], repeat=3)):
        a = np.eye(4)
        a[:3, :3] = 0.0
        for col, row in enumerate(perm):
            a[row, col] = signs[col] * (0.7, 1.3, 2.5)[col]
        a[:3, 3] = rng.normal(0, 30, 3)
        out.append(a)
    for _ in range(10):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        a = np.eye(4)
        a[:3, :3] = q * rng.uniform(0.4, 3.0, 3)
        a[:3, 3] = rng.normal(0, 30, 3)
        out.append(a)
    return out


def test_lps_to_ras_negates_x_and_y_and_is_its_own_inverse() -> None:
    points = np.array([[1.5, -2.0, 3.0], [0.0, 4.0, -7.25]])
    np.testing.assert_array_equal(lps_to_ras(points), [[-1.5, 2.0, 3.0], [0.0, -4.0, -7.25]])
    np.testing.assert_array_equal(lps_to_ras(lps_to_ras(points)), points)
    np.testing.assert_array_equal(lps_to_ras([1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


@pytest.mark.parametrize("index", range(len(affines())))
def test_to_sitk_puts_every_voxel_at_its_lps_world_point_and_back(index: int) -> None:
    affine = affines()[index]
    vol = Volume(np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5), affine)
    img = to_sitk(vol)
    assert img.GetSize() == (3, 4, 5)
    for ijk in [(0, 0, 0), (2, 3, 4), (1, 0, 3)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps, lps_to_ras((affine @ [*ijk, 1])[:3]), atol=1e-9)
        assert img[ijk] == vol.array[ijk]
    back = from_sitk(img)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-12)


def test_vector_volumes_become_vector_images_and_thin_volumes_stay_3d() -> None:
    field = np.random.default_rng(1).normal(size=(4, 3, 2, 3))
    img = to_sitk(Volume(field, affines()[5]), dtype=np.float64)
    assert img.GetNumberOfComponentsPerPixel() == 3 and img.GetSize() == (4, 3, 2)
    np.testing.assert_array_equal(img[3, 1, 0], field[3, 1, 0])
    np.testing.assert_array_equal(from_sitk(img).array, field)
    thin = to_sitk(Volume(np.ones((4, 3, 1), np.float32), affines()[7]))
    assert thin.GetDimension() == 3 and thin.GetSize() == (4, 3, 1)


def test_from_sitk_keeps_the_pixel_type() -> None:
    """Unlike torchio's `sitk_to_nib`, which widens uint16 to int32 for torch."""
    img = to_sitk(Volume(np.arange(24, dtype=np.uint16).reshape(2, 3, 4), np.eye(4)), dtype=np.uint16)
    assert from_sitk(img).array.dtype == np.uint16
    assert sitk_to_nib(img)[0].dtype == np.int32


def test_sitk_ras_affine_equals_torchio_bit_for_bit_2d_3d_and_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for affine in affines():
        img = to_sitk(Volume(np.zeros((3, 4, 5), np.float32), affine))
        assert sitk_ras_affine(img).tobytes() == get_ras_affine_from_sitk(img).tobytes()
    flat = sitk.Image(5, 4, sitk.sitkFloat32)
    flat.SetDirection(np.linalg.qr(rng.normal(size=(2, 2)))[0].ravel().tolist())
    flat.SetOrigin([3.0, -2.0])
    flat.SetSpacing([0.5, 2.0])
    assert sitk_ras_affine(flat).tobytes() == get_ras_affine_from_sitk(flat).tobytes()
    sitk.WriteImage(to_sitk(Volume(np.zeros((3, 4, 5), np.float32), affines()[30])), str(tmp_path / "x.nrrd"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "x.nrrd"))
    reader.ReadImageInformation()
    np.testing.assert_allclose(sitk_ras_affine(reader), affines()[30], atol=1e-12)


def test_an_nrrd_written_through_sitk_loads_on_the_same_world_grid(tmp_path: Path) -> None:
    affine = affines()[40]
    vol = Volume(np.random.default_rng(3).normal(size=(3, 4, 5)).astype(np.float32), affine)
    sitk.WriteImage(to_sitk(vol), str(tmp_path / "v.nrrd"))
    loaded = load_volume(tmp_path / "v.nrrd")  # canonical RAS: compare a world point's value
    ijk = np.array([2, 1, 3])
    world = (affine @ [*ijk, 1])[:3]
    back = np.rint(np.linalg.solve(loaded.affine, [*world, 1])[:3]).astype(int)
    assert loaded.array[tuple(back)] == vol.array[tuple(ijk)]
