"""Transform presets keep world geometry; intensity presets; crops; 2D slices; training-only augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.volume import Volume
from transforms.augment import EpisodeAugmenter, build_augmenter
from transforms.config import AugmentConfig, TransformConfig
from transforms.presets import (
    CT_WINDOWS,
    crop_around,
    extract_slices,
    image_2d,
    volume_preset,
    volume_to_dict,
    world_to_voxel,
)


def lps_volume() -> tuple[Volume, Volume, np.ndarray]:
    """A 2 x 2 x 3 mm volume whose array axes run L, P, S (affine with negative x and y), one bright voxel."""
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    affine[:3, 3] = [40.0, 30.0, -12.0]
    image = np.full((20, 16, 10), -1000.0, np.float32)
    label = np.zeros((20, 16, 10), np.float32)
    image[6:9, 4:7, 3:6] = 400.0  # a 3-voxel cube
    label[6:9, 4:7, 3:6] = 3
    centre_world = (affine @ [7, 5, 4, 1])[:3]
    return Volume(image, affine), Volume(label, affine), centre_world


def test_preset_reorients_to_ras_and_keeps_world_points_on_the_same_content() -> None:
    image, label, point = lps_volume()
    assert image.orientation == "LPS"
    out = volume_preset(TransformConfig(spacing=(1.0, 1.0, 1.0)), "CT")(volume_to_dict(image, label))
    img, lab = out["image"], out["label"]
    affine = np.asarray(img.affine)
    assert np.all(np.diag(affine)[:3] > 0) and np.allclose(np.abs(np.diag(affine)[:3]), 1.0)  # RAS, 1 mm
    v = np.round(world_to_voxel(img, point)).astype(int)
    assert float(img[0][tuple(v)]) == pytest.approx(1.0)  # 400 HU = top of the (-1000, 400) window
    assert float(lab[0][tuple(v)]) == 3
    # far from the cube: background
    far = np.round(world_to_voxel(img, (image.affine @ [15, 12, 8, 1])[:3])).astype(int)
    assert float(img[0][tuple(far)]) == pytest.approx(0.0)
    # labels resampled nearest-neighbour: no interpolated values appear
    assert set(torch.unique(lab).tolist()) == {0.0, 3.0}


def test_crop_around_a_world_point_is_centred_on_it_along_every_axis() -> None:
    image, _, point = lps_volume()
    cfg = TransformConfig(spacing=(1.0, 1.0, 1.0), roi_size=(8, 8, 8))
    prepared = volume_preset(cfg, "CT")(volume_to_dict(image))["image"]
    crop = crop_around(prepared, point, cfg)
    assert crop.shape == (1, 8, 8, 8)
    assert float(crop[0, 4, 4, 4]) == pytest.approx(1.0)
    # the cube (9 x 9 x 9 mm) is centred: its extent along each axis is symmetric about index 4
    for axis in range(3):
        profile = crop[0].amax(dim=tuple(a for a in range(3) if a != axis))
        inside = torch.nonzero(profile > 0.5).ravel()
        assert abs((inside.min() + inside.max()).item() / 2 - 4) <= 0.5, f"off-centre along axis {axis}"
    # 2D: the central axial slice of the crop
    flat = crop_around(prepared, point, TransformConfig(spacing=(1.0, 1.0, 1.0), roi_size=(8, 8, 8),
                                                        slice_axis="axial"))
    assert flat.shape == (1, 8, 8) and torch.equal(flat, crop[:, :, :, 4])


def test_ct_windows_and_custom() -> None:
    vol = Volume(np.array([[[-1350.0, -160.0, 40.0, 240.0, 1300.0]]], np.float32).reshape(5, 1, 1), np.eye(4))
    soft = volume_preset(TransformConfig(ct_window="soft_tissue", spacing=None), "CT")(volume_to_dict(vol))["image"]
    np.testing.assert_allclose(soft.ravel().numpy(), [0, 0, 0.5, 1, 1], atol=1e-6)
    lung = volume_preset(TransformConfig(ct_window="lung", spacing=None), "CT")(volume_to_dict(vol))["image"]
    assert float(lung.ravel()[0]) == 0.0 and float(lung.ravel()[3]) == 1.0
    assert CT_WINDOWS["bone"] == (-500.0, 1300.0)
    custom = TransformConfig(ct_window="custom", window=(0.0, 100.0), spacing=None)
    assert float(volume_preset(custom, "CT")(volume_to_dict(vol))["image"].ravel()[2]) == pytest.approx(0.4)


def test_mr_normalisation_and_auto_preset() -> None:
    rng = np.random.default_rng(0)
    vol = Volume((rng.random((12, 12, 12)) * 500 + 100).astype(np.float32), np.eye(4), {"modality": "MR"})
    pct = volume_preset(TransformConfig(preset="auto", spacing=None), "MR")(volume_to_dict(vol))["image"]
    assert float(pct.min()) == 0.0 and float(pct.max()) == 1.0
    z = volume_preset(TransformConfig(preset="mr", mr_norm="zscore", spacing=None))(volume_to_dict(vol))["image"]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-2
    none = volume_preset(TransformConfig(preset="auto", spacing=None), "US")(volume_to_dict(vol))["image"]
    np.testing.assert_allclose(none[0].numpy(), vol.array)


def test_n4_removes_a_smooth_bias_field() -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 24, 24), np.float32)  # air around a body (Otsu masks the body)
    truth[2:22, 2:22, 2:22] = 200.0
    truth[8:16, 8:16, 8:16] = 400.0  # two tissues
    ramp = np.linspace(0.7, 1.3, 24, dtype=np.float32)[:, None, None]  # multiplicative bias along I
    biased = Volume(truth * ramp + rng.normal(0, 2, truth.shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))

    def slab_ratio_error(x: torch.Tensor) -> float:  # the same tissue at low I and at high I should match
        x = np.asarray(x[0])
        return abs(x[3:6, 3:6, 3:21].mean() / x[18:21, 3:6, 3:21].mean() - 1)

    def run(n4: bool) -> torch.Tensor:
        cfg = TransformConfig(preset="mr", n4=n4, percentiles=(0.0, 100.0), spacing=None)
        return volume_preset(cfg, "MR")(volume_to_dict(biased))["image"]

    assert slab_ratio_error(run(False)) > 0.3  # the bias is there (0.7 vs 1.3 across the volume)
    assert slab_ratio_error(run(True)) < 0.05


def test_volume_size_crops_or_pads_image_and_label_together() -> None:
    image, label, _ = lps_volume()
    cfg = TransformConfig(spacing=None, volume_size=(16, 16, 16))
    out = volume_preset(cfg, "CT")(volume_to_dict(image, label))
    assert out["image"].shape == (1, 16, 16, 16) and out["label"].shape == (1, 16, 16, 16)
    assert torch.equal(out["label"][0] == 3, out["image"][0] == 1.0)


def test_slices_and_2d_scaling() -> None:
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    axial = extract_slices(vol, axis=2)
    assert axial.shape == (5, 2, 3, 4) and torch.equal(axial[1], vol[:, :, :, 1])
    assert extract_slices(vol, axis=0, indices=[2]).shape == (1, 2, 4, 5)
    img = np.array([[[0, 255], [128, 64]]], np.uint8)
    np.testing.assert_allclose(image_2d(img).numpy(), img / 255.0, atol=1e-6)
    assert image_2d(np.zeros((3, 1, 10, 12), np.uint16), (5, 6)).shape == (3, 1, 5, 6)


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentation_is_seeded_changes_items_and_keeps_shape(dims: int) -> None:
    cfg = AugmentConfig(enabled=True, prob=1.0, flip_axes=[0], bias_field=0.3)
    aug = build_augmenter(cfg, dims)
    assert isinstance(aug, EpisodeAugmenter)
    x = torch.rand((4, 1) + (12,) * dims)
    a, b = aug(x, np.random.default_rng(3)), aug(x, np.random.default_rng(3))
    c = aug(x, np.random.default_rng(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    assert build_augmenter(AugmentConfig(enabled=False), dims) is None
    # torch's global generator is left as it was (torchio draws from it inside a fork)
    torch.manual_seed(0)
    aug(x, np.random.default_rng(0))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_flip_only_augmentation_is_an_exact_mirror() -> None:
    cfg = AugmentConfig(enabled=True, prob=1.0, flip_axes=[1], rotate_deg=0, scale=0, noise_std=0, intensity_shift=0,
                        intensity_scale=0, gamma=None)
    x = torch.rand(3, 1, 6, 7)
    assert torch.equal(EpisodeAugmenter(cfg, 2)(x, np.random.default_rng(0)), torch.flip(x, dims=[3]))
    with pytest.raises(ValueError, match="flip_axes"):
        EpisodeAugmenter(AugmentConfig(flip_axes=[2]), 2)
