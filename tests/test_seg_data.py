"""Segmentation cases through the `transforms` preset, the run config that records it, and view augmentation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.volume import FewscanError, Volume
from pipeline.common.config import ConfigError, load_config, validate
from pipeline.segmentation.data import make_case
from transforms.augment import augment_view, check_view_augment
from transforms.config import AugmentConfig

REPO = Path(__file__).resolve().parents[1]
LPS = np.array([[-1.5, 0, 0, 30], [0, -1.2, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]])  # stored LPS, anisotropic


def _tcfg(**transforms):
    return validate({"task": "segmentation", "transforms": {"spacing": None, **transforms}}).transforms


def test_mr_case_is_the_percentile_normalisation_in_ras() -> None:
    """MR: the 0.5th and 99.5th percentiles map to 0 and 1 (clipped beyond), computed in float64 as segmentation
    always did, on the RAS-reoriented array; bit for bit."""
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 150.0, size=(20, 16, 12)).astype(np.float32)
    case = make_case("c", Volume(image, LPS), None, {}, _tcfg(preset="mr", percentiles=[0.5, 99.5]))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(image, LPS))
    ras = np.asarray(canonical.dataobj, np.float32)
    low, high = np.percentile(ras, [0.5, 99.5])
    expected = np.clip((ras - low) / (high - low), 0, 1).astype(np.float32)
    assert case.image.dtype == np.float32 and np.array_equal(case.image, expected)
    assert np.allclose(case.affine, canonical.affine)
    assert case.image.min() == 0 and case.image.max() == 1
    assert 0.003 < (case.image == 0).mean() < 0.007 and 0.003 < (case.image == 1).mean() < 0.007


def test_ct_case_is_the_hu_window() -> None:
    hu = np.array([-1000, -200, -150, 50, 300, 2000], np.float32).reshape(3, 2, 1).repeat(2, axis=2)
    case = make_case("c", Volume(hu, np.eye(4)), None, {}, _tcfg(preset="ct", ct_window="custom", window=[-200, 300]))
    assert case.image[:, :, 0].ravel().tolist() == [0.0, 0.0, np.float32(50 / 500), 0.5, 1.0, 1.0]
    assert np.array_equal(case.image, np.clip((hu + 200.0) / 500.0, 0, 1).astype(np.float32))


def test_label_on_another_grid_lands_in_world_coordinates() -> None:
    image = np.random.default_rng(1).random((10, 8, 6)).astype(np.float32)
    label = np.zeros((10, 8, 6), np.uint8)
    label[4, 3, 2] = 1
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # the label's voxel 4 sits at x = 6 mm: image voxel 6
    case = make_case("c", Volume(image, np.eye(4)), Volume(label, shifted), {1: "dot", 0: "background"},
                     _tcfg(preset="mr"))
    assert np.argwhere(case.label).tolist() == [[6, 3, 2]] and case.names == {1: "dot"}


def test_old_segmentation_intensity_keys_are_gone() -> None:
    for key in ("modality", "window", "spacing"):
        with pytest.raises(ConfigError, match=f"unknown key 'segmentation.{key}'"):
            validate({"task": "segmentation", "segmentation": {key: None}})


def test_view_augmentation_is_seeded_configured_and_checked() -> None:
    view = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    cfg = AugmentConfig(enabled=True, prob=1.0, gamma=(0.7, 1.5), noise_std=0.02)
    a = augment_view(view, cfg, np.random.default_rng(5))
    assert np.array_equal(a, augment_view(view, cfg, np.random.default_rng(5)))
    assert not np.array_equal(a, augment_view(view, cfg, np.random.default_rng(6)))
    assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1 and not np.array_equal(a, view)
    off = AugmentConfig(enabled=True, prob=0.0, gamma=(0.7, 1.5), noise_std=0.02)
    assert np.array_equal(augment_view(view, off, np.random.default_rng(5)), view)
    with pytest.raises(FewscanError, match="rotate_deg=10.0"):
        check_view_augment(AugmentConfig(enabled=True))  # the classification defaults rotate and scale
    check_view_augment(AugmentConfig(enabled=False))


def test_run_config_records_the_transforms_used_and_evaluation_never_augments(tmp_path: Path, monkeypatch) -> None:
    """Every case of train and evaluate is preprocessed with the run's `transforms` as written to config.yaml (MR,
    percentiles 0.5/99.5, no resampling); views are augmented in training only, the same for the same seed."""
    import pipeline.segmentation.data as data
    import pipeline.segmentation.episodes as episodes
    from datasets.synth_decathlon import write_synthetic_organs
    from pipeline.common.run import load_run_config
    from pipeline.segmentation.evaluate import evaluate
    from pipeline.segmentation.train import train

    used, augmented = [], []
    preset = data.volume_preset

    def recording_preset(cfg, modality=None):  # noqa: ANN202 - the preset's Compose
        used.append(cfg)
        return preset(cfg, modality)

    monkeypatch.setattr(data, "volume_preset", recording_preset)
    monkeypatch.setattr(episodes, "augment_view", lambda x, cfg, rng: augmented.append(1) or augment_view(x, cfg, rng))
    root = write_synthetic_organs(tmp_path / "Task99", n_cases=4, shape=(16, 16, 10))
    cfg = load_config(REPO / "configs" / "segment_decathlon_ssl.yaml", [
        f"data.root={root}", "train.iterations=2", "episodes.eval_episodes=1", "segmentation.channels=[4, 8]",
        "segmentation.features=4", "segmentation.n_supervoxels=10", "segmentation.baselines=[]",
        "segmentation.overlays=0", "segmentation.test_patients=0.5", "train.tensorboard=false"])
    run = train(cfg, tmp_path / "run")
    recorded = load_run_config(run).transforms
    assert recorded.preset == "mr" and recorded.percentiles == (0.5, 99.5) and recorded.spacing is None
    assert recorded.augment.enabled and recorded.augment.gamma == (0.7, 1.5)
    assert used and all(c == recorded for c in used) and augmented
    used.clear(), augmented.clear()
    evaluate(run)
    assert used and all(c == recorded for c in used) and not augmented
