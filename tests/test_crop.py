"""Crops and pads (`transforms.crop`): the same values as the hand-written versions they replace, on odd sizes and
centres partly or wholly outside the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from datasets.volume import Volume
from transforms.config import TransformConfig
from transforms.crop import crop_at, fit_size, pad_divisible
from transforms.presets import crop_around, prepare, volume_to_dict


def reference_crop(array: np.ndarray, centre: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Voxel by voxel: out[o] = array[centre - size // 2 + o] where that index exists, else 0."""
    out = np.zeros(size, array.dtype)
    lo = np.asarray(centre, int) - np.asarray(size) // 2
    for o in np.ndindex(*size):
        src = lo + np.asarray(o)
        if np.all(src >= 0) and np.all(src < array.shape):
            out[o] = array[tuple(src)]
    return out


@pytest.mark.parametrize("dtype", [np.float32, bool, np.int16])
def test_crop_at_equals_the_voxel_by_voxel_crop_anywhere(dtype: type) -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        dims = int(rng.integers(1, 4))
        shape = tuple(int(s) for s in rng.integers(1, 9, dims))
        size = tuple(int(s) for s in rng.integers(1, 8, dims))  # odd and even, larger and smaller than the image
        array = (rng.normal(size=shape) * 10).astype(dtype)
        centre = np.array([rng.integers(-s - 2, n + s + 2) for n, s in zip(shape, size, strict=True)])  # often outside
        crop = crop_at(array, centre, size)
        assert crop.dtype == array.dtype
        np.testing.assert_array_equal(crop, reference_crop(array, centre, size))


def test_crop_at_keeps_leading_axes_and_tensors_and_never_aliases_numpy() -> None:
    image = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    crop = crop_at(image, [1, 5], (3, 4))
    assert crop.shape == (2, 3, 4)
    for c in range(2):
        np.testing.assert_array_equal(crop[c], reference_crop(image[c], np.array([1, 5]), (3, 4)))
    torch.testing.assert_close(crop_at(torch.from_numpy(image), [1, 5], (3, 4)), torch.from_numpy(crop))
    inside = crop_at(image, [2, 3], (3, 3))
    inside[:] = -1
    assert image.min() == 0  # a crop needing no padding is still a copy


def test_crop_at_moves_a_metatensor_affine_to_the_crop() -> None:
    affine = torch.tensor([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 1.0, 30], [0, 0, 0, 1]], dtype=torch.float64)
    image = MetaTensor(torch.arange(6 * 7 * 5, dtype=torch.float32).reshape(1, 6, 7, 5), affine=affine)
    crop = crop_at(image, [3, 1, 2], (3, 4, 3))  # starts at (2, -1, 1): one zero row before along J
    assert isinstance(crop, MetaTensor) and crop.shape == (1, 3, 4, 3)
    torch.testing.assert_close(crop.as_tensor()[0], torch.from_numpy(reference_crop(image.numpy()[0],
                                                                                     np.array([3, 1, 2]), (3, 4, 3))))
    # voxel (0, 0, 0) of the crop is voxel (2, -1, 1) of the image
    torch.testing.assert_close(crop.affine[:3, 3], affine[:3, :3] @ torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
                               + affine[:3, 3])


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (1, 3, 9, 4, 6), (3, 2, 8, 16)])
@pytest.mark.parametrize("divisor", [1, 4, 8])
def test_pad_divisible_pads_evenly_and_its_crop_undoes_it(shape: tuple[int, ...], divisor: int) -> None:
    x = torch.randn(shape)
    padded, crop = pad_divisible(x, divisor)
    extra = [(-s) % divisor for s in shape[2:]]
    pads = [p for e in reversed(extra) for p in (e // 2, e - e // 2)]  # the odd voxel goes after
    assert type(padded) is torch.Tensor
    torch.testing.assert_close(padded, F.pad(x, pads), rtol=0, atol=0)
    assert all(s % divisor == 0 for s in padded.shape[2:])
    torch.testing.assert_close(padded[crop], x, rtol=0, atol=0)


def test_fit_size_centre_crops_and_pads() -> None:
    image = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 4)
    out = fit_size(image, (3, 6))
    assert out.shape == (1, 3, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 1:5], image[0, 1:4])
    assert not out[0, :, 0].any() and not out[0, :, 5].any()


def test_crop_around_refuses_centres_off_the_volume_on_either_side() -> None:
    cfg = TransformConfig(spacing=(1.0, 1.0, 1.0), roi_size=(8, 8, 8), preset="none")
    image = prepare(cfg, None)(volume_to_dict(Volume(np.ones((12, 12, 12), np.float32), np.eye(4))))["image"]
    assert crop_around(image, [0.0, 11.0, 5.0], cfg).shape == (1, 8, 8, 8)  # edge voxels: zero-padded crop
    for point in ([-3.0, 5.0, 5.0], [5.0, 15.0, 5.0]):
        with pytest.raises(ValueError, match="outside the volume"):
            crop_around(image, point, cfg)
