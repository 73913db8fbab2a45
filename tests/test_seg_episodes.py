"""Segmentation episodes: held-out structures, patient separation, determinism, pseudo-structures."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.synth_decathlon import SYNTH_STRUCTURES, synthetic_case
from datasets.volume import Volume
from pipeline.common.config import validate
from pipeline.segmentation.data import make_case, split_structures
from pipeline.segmentation.episodes import fixed_episodes, labelled_episode, pseudo_episode, role_ids

SHAPE = (20, 24, 18)


MR = {"preset": "mr", "spacing": None, "percentiles": [0.5, 99.5]}
CT3 = {"preset": "ct", "spacing": [3.0, 3.0, 3.0], "window": [-200, 300]}


def _cfg(transforms: dict | None = None, **seg):
    return validate({"task": "segmentation", "episodes": {"shots": 2, "queries": 2, "eval_episodes": 3},
                     "transforms": transforms or MR, "segmentation": {"crop": [16, 16, 16], "test_patients": 0, **seg}})


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        image, label = synthetic_case(rng, SHAPE)
        out.append(make_case(f"c{i}", Volume(image, np.eye(4)), Volume(label, np.eye(4)), SYNTH_STRUCTURES,
                             _cfg().transforms))
    return out


def test_no_patient_on_both_sides_and_same_seed_same_episodes(cases) -> None:
    cfg = _cfg(held_out=["spleen"])
    eps = fixed_episodes(cfg, "test", 5, cases)
    assert len(eps) == 5 and {e["structure"] for e in eps} == {"spleen"}
    for ep in eps:
        sides = {role: {c["patient_key"] for c in ep["cases"] if c["role"] == role} for role in ("support", "query")}
        assert len(sides["support"]) == 2 and sides["query"]
        assert not sides["support"] & sides["query"]
    assert fixed_episodes(cfg, "test", 5, cases) == eps
    assert fixed_episodes(validate({**_cfg(held_out=["spleen"]).__dict__, "seed": 1}), "test", 5, cases) != eps


def test_held_out_structure_never_in_training_episodes(cases) -> None:
    cfg = _cfg(held_out=["spleen"], supervision="labels", setting=2)
    split = split_structures(cases, ["spleen"])
    assert split == {"train": ["kidney", "liver"], "test": ["spleen"]}
    by_id = {c.case_id: c for c in cases}
    rng = np.random.default_rng(0)
    drawn = 0
    for _ in range(30):
        info: dict = {}
        ep = labelled_episode(cases, split["train"], cfg, rng, split["test"], info)
        assert info["structure"] != "spleen"
        keys = {role: {c["patient_key"] for c in info["record"]["cases"] if c["role"] == role}
                for role in ("support", "query")}
        assert not keys["support"] & keys["query"]
        if ep is None:
            continue
        drawn += 1
        for case_id, (_, _, k) in info["views"]:  # Setting 2: no training slice touches the held-out organ
            assert not by_id[case_id].mask("spleen")[:, :, k].any()
    assert drawn > 0


def test_pseudo_label_episodes_have_non_trivial_masks(cases) -> None:
    for mode, kind in (("2d", "slic"), ("3d", "slic"), ("2d", "felzenszwalb")):
        cfg = _cfg(mode=mode, supervoxels=kind, n_supervoxels=20)
        rng = np.random.default_rng(0)
        got = [e for e in (pseudo_episode(cases, cfg, rng, []) for _ in range(6)) if e is not None]
        assert got, (mode, kind)
        for sx, sm, qx, qm in got:
            assert sx.shape == sm.shape and qx.shape == qm.shape and sx.shape[1] == 1
            for m in (sm, qm):
                share = m.float().mean().item()
                assert 0 < share < 0.9, (mode, kind, share)


def test_training_stream_same_for_any_worker_count_and_resumes(cases) -> None:
    """Episode i is a function of (seed, i): 0 or 2 DataLoader workers, or a resume at i=3, give the same tensors."""
    from pipeline.common.episodes import episode_loader
    from pipeline.segmentation.episodes import SegEpisodes, precompute_supervoxels

    cfg = _cfg(supervision="self", mode="3d")
    precompute_supervoxels(cases, cfg.segmentation, workers=2)
    assert all(c._sv is not None and len(np.unique(c._sv)) > 2 for c in cases)
    split = split_structures(cases, [])
    single = list(episode_loader(SegEpisodes(cases, cfg, split, length=6), workers=0))
    multi = list(episode_loader(SegEpisodes(cases, cfg, split, length=6), workers=2, prefetch=2))
    tail = list(episode_loader(SegEpisodes(cases, cfg, split, length=6, start=3), workers=0))
    assert len(single) == len(multi) == 6 and len(tail) == 3
    for a, b in zip(single, multi, strict=True):
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b, strict=True))
    for a, b in zip(single[3:], tail, strict=True):
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(single[0][0].numpy(), single[1][0].numpy())  # episodes differ from each other


@pytest.mark.realdata
def test_totalsegmentator_ct_and_mr_give_organ_episodes(shared_data) -> None:
    """Real label maps: one task per organ; a held-out liver episode takes support and query from the two CT
    subjects (the NIfTI one and the DICOM one); the MR subject gives self-supervised episodes."""
    from datasets.dicom import load_series
    from datasets.sources import load_label_map, load_nifti, read_label_names

    root = shared_data / "totalsegmentator_example"
    if not (root / "class_map_total.json").is_file():
        pytest.skip(f"{root} lacks class_map_total.json")
    ct_names = read_label_names(root / "class_map_total.json", "total")
    mr_names = read_label_names(root / "class_map_total.json", "total_mr")
    tcfg = validate({"task": "segmentation", "transforms": CT3}).transforms
    cases = [make_case("ct_a", load_nifti(root / "example_ct_sm.nii.gz"),
                       load_label_map(root / "example_seg.nii.gz", ct_names), ct_names, tcfg),
             make_case("ct_b", load_series(root / "example_ct_dicom"),
                       load_label_map(root / "example_seg_dicom.nii.gz", ct_names), ct_names, tcfg)]
    assert {"liver", "spleen", "stomach"} <= cases[0].structures() & cases[1].structures()
    cfg = validate({"task": "segmentation", "episodes": {"shots": 1, "queries": 1}, "transforms": CT3,
                    "segmentation": {"held_out": ["liver"], "test_patients": 0}})
    episodes = fixed_episodes(cfg, "test", 4, cases)
    assert {e["structure"] for e in episodes} == {"liver"}
    for ep in episodes:
        support, query = role_ids(ep, "support"), role_ids(ep, "query")
        assert len(support) == len(query) == 1 and support != query
    # in world coordinates the liver of both CTs reads soft tissue (normalised window [-200, 300] HU -> [0, 1])
    for case in cases:
        inside = case.image[case.mask("liver")]
        assert 0.45 < float(np.median(inside)) < 0.75, case.case_id
    mr_cfg = _cfg({**MR, "spacing": [3.0, 3.0, 3.0]}, supervision="self", mode="2d")
    mr = make_case("mr_a", load_nifti(root / "example_mr_sm.nii.gz"),
                   load_label_map(root / "example_seg_mr.nii.gz", mr_names), mr_names, mr_cfg.transforms)
    assert len(mr.structures()) == 23
    episode = None
    rng = np.random.default_rng(0)
    for _ in range(20):
        episode = episode or pseudo_episode([mr], mr_cfg, rng, [])
    assert episode is not None
    sx, sm, qx, qm = episode
    assert 0 < float(sm.mean()) < 0.9 and 0 < float(qm.mean()) < 0.9
