"""Learned label propagation (`segmentation.method: propagate`): grid handling, fusion, a known deformation, and
training that never reads a label."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.common.config import RegistrationConfig, load_config
from pipeline.registration.deformation import warp
from pipeline.segmentation.propagate import from_grid, fuse, network_grid, propagate, to_grid

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "segment_propagate.yaml"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_grid_is_the_largest_shape_rounded_up_and_padding_round_trips() -> None:
    rcfg = RegistrationConfig(levels=3, half_res=True)  # divisor 8
    assert network_grid([(30, 41, 20), (33, 40, 17)], rcfg) == (40, 48, 24)
    image = np.random.default_rng(0).random((30, 41, 20)).astype(np.float32)
    x = to_grid(image, (32, 40, 24))  # padded on two sides, cropped on one
    assert x.shape == (1, 1, 32, 40, 24) and type(x) is torch.Tensor  # a plain tensor, not a MetaTensor
    back = from_grid(x, image.shape)
    # the cropped-away column of the middle axis comes back as zero, every other voxel exactly
    kept = np.abs(back - image) < 1e-7
    assert kept.mean() > 0.97 and np.all(back[~kept] == 0)


def test_fusion_of_identical_supports_equals_one_support() -> None:
    g = torch.Generator().manual_seed(0)
    label, image, query = torch.rand(1, 1, 12, 12, 12, generator=g), torch.rand(1, 1, 12, 12, 12, generator=g), \
        torch.rand(1, 1, 12, 12, 12, generator=g)
    fused = fuse(label.repeat(3, 1, 1, 1, 1), image.repeat(3, 1, 1, 1, 1), query)
    assert torch.allclose(fused, label, atol=1e-6)


def test_local_fusion_follows_the_support_that_matches_the_query_there() -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.rand(1, 1, 16, 16, 16, generator=g)
    other = torch.rand(1, 1, 16, 16, 16, generator=g)
    # support 0 looks like the query in the left half, support 1 in the right half
    left = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    left[..., :8] = True
    images = torch.cat([torch.where(left, query, other), torch.where(left, other, query)])
    labels = torch.cat([torch.ones(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)])
    fused = fuse(labels, images, query)[0, 0]
    assert fused[..., :5].mean() > 0.9 and fused[..., 11:].mean() < 0.1  # away from the seam: the matching one
    assert torch.allclose(fuse(labels, images, query, local=False), torch.full_like(query, 0.5))


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A labelled phantom (support image + mask) and its known smooth deformation (query image + true mask)."""
    size = (32, 32, 32)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"))
    organ = ((grid - np.array([15.0, 16.0, 16.0]).reshape(3, 1, 1, 1)) ** 2 / np.array([49.0, 36.0, 30.0])
             .reshape(3, 1, 1, 1)).sum(0) <= 1.0
    image = (0.3 + 0.5 * organ + 0.1 * grid[1] / 32).astype(np.float32)
    ddf = np.zeros((1, 3, *size), np.float32)
    ddf[0, 0] = 3.0 * np.sin(np.pi * grid[1] / 31) * np.sin(np.pi * grid[2] / 31)
    ddf[0, 1] = 2.0 * np.sin(np.pi * grid[0] / 31)
    t = torch.from_numpy(ddf)
    query = warp(torch.from_numpy(image)[None, None], t)[0, 0].numpy()
    truth = warp(torch.from_numpy(organ.astype(np.float32))[None, None], t)[0, 0].numpy() > 0.5
    return image, organ, query, truth


def test_propagation_recovers_a_known_deformation_of_a_labelled_phantom() -> None:
    from pipeline.registration.network import RegistrationNet

    image, organ, query, truth = _phantom()
    rcfg = RegistrationConfig(prealign="none", levels=2, features=4, lncc_kernel=5, instance_steps=120,
                              instance_lr=0.2)
    torch.manual_seed(0)
    net = RegistrationNet(rcfg, (32, 32, 32))  # zero-initialised output: the identity before instance steps
    unregistered = dice(organ, truth)
    one = propagate(net, rcfg, [(image, organ)], query, (32, 32, 32))
    assert one.shape == query.shape and one.dtype == bool
    assert dice(one, truth) > 0.93 and dice(one, truth) > unregistered + 0.05, (dice(one, truth), unregistered)
    # two identical supports fuse to exactly the one-support answer
    assert np.array_equal(propagate(net, rcfg, [(image, organ)] * 2, query, (32, 32, 32)), one)
    # an empty support mask gives an empty prediction (documented), not a crash
    empty = propagate(net, replace(rcfg, instance_steps=2), [(image, np.zeros_like(organ))], query, (32, 32, 32))
    assert not empty.any()


def _train(root: Path, out: Path) -> Path:
    from pipeline.segmentation.train import train

    cfg = load_config(CONFIG, [f"data.root={root}", "transforms.spacing=null", "train.iterations=3",
                               "train.log_every=1", "train.threads=1", "train.tensorboard=false",
                               "registration.levels=2", "registration.features=4", "registration.train_pairs=8",
                               "registration.inner_steps=2"])
    return train(cfg, out)


@pytest.mark.slow
def test_training_never_reads_a_label(tmp_path: Path) -> None:
    """Same images, every label map replaced by noise: training gives bit-identical weights."""
    from datasets.synth_decathlon import write_synthetic_organs

    root = write_synthetic_organs(tmp_path / "Task", n_cases=4, shape=(24, 24, 16))
    first = _train(root, tmp_path / "a")
    rng = np.random.default_rng(1)
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        old = nib.load(str(path))
        noise = rng.integers(0, 4, old.shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(noise, old.affine), str(path))
    second = _train(root, tmp_path / "b")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(a[k], load_file(str(first / "untrained.safetensors"))[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_scores_propagation_against_the_atlas_on_the_same_episodes(tmp_path: Path) -> None:
    from datasets.synth_decathlon import write_synthetic_organs
    from pipeline.segmentation.evaluate import evaluate

    root = write_synthetic_organs(tmp_path / "Task", n_cases=4, shape=(24, 24, 16))
    run = _train(root, tmp_path / "run")
    report = evaluate(run, overrides=["episodes.eval_episodes=1", "registration.instance_steps=5"])
    assert report["method"] == "propagate"
    n = report["episodes"]
    for block in (report, report["untrained"], report["baseline_atlas"]):
        assert len(block["per_episode"]) == n and 0.0 <= block["metrics"]["dice"]["mean"] <= 1.0
    assert set(report["paired"]) == {"untrained", "baseline_atlas"}
    assert "baseline_finetune" not in report  # there is no segmentation network to fine-tune


@pytest.mark.slow
def test_adapt_then_predict_propagates_the_support_labels_onto_a_new_scan(tmp_path: Path) -> None:
    """`adapt` keeps the support scans; `predict` registers each to a new scan and writes its mask in the scan's
    own geometry, overlapping the scan's true structure far better than the support mask left in place."""
    from datasets.synth_decathlon import write_synthetic_organs
    from pipeline.segmentation.adapt import adapt, predict

    root = write_synthetic_organs(tmp_path / "Task", n_cases=5, shape=(24, 24, 16))
    run = _train(root, tmp_path / "run")
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    images = [root / "imagesTr" / p.name for p in labels]
    (tmp_path / "support.csv").write_text("image,label\n" + "".join(f"{i},{lab}\n" for i, lab in
                                                                     zip(images[:2], labels[:2], strict=True)))
    summary = adapt(run, tmp_path / "support.csv", tmp_path / "adapted", structure="liver")
    assert summary["method"] == "propagate" and summary["shots"] == 2
    rows = predict(tmp_path / "adapted", [images[4]], tmp_path / "pred")
    pred = np.asarray(nib.load(rows[0]["nifti"]).dataobj) > 0
    source = nib.load(str(labels[4]))
    names = {v: k for k, v in json.loads((root / "dataset.json").read_text())["labels"].items()}
    truth = np.asarray(source.dataobj) == int(names["liver"])
    assert pred.shape == truth.shape and np.allclose(nib.load(rows[0]["nifti"]).affine, source.affine)
    in_place = np.asarray(nib.load(str(labels[0])).dataobj) == int(names["liver"])
    assert dice(pred, truth) > 0.8 and dice(pred, truth) > dice(in_place, truth) + 0.1, (dice(pred, truth),
                                                                                   dice(in_place, truth))
