"""Registration pairs: same task on both sides, patients held out, seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasets.synth_decathlon import write_synthetic_subjects
from pipeline.common.config import validate
from pipeline.registration.episodes import fixed_pairs, roles


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("reg")
    a = write_synthetic_subjects(base / "a", n_cases=10, shape=(8, 8, 8), seed=0, name="Brain", modality="MRI")
    b = write_synthetic_subjects(base / "b", n_cases=4, shape=(8, 8, 8), seed=1, name="Liver", modality="CT")
    return a, b


def cfg_for(root: Path, extra: Path | None = None, seed: int = 0, **reg):
    return validate({"task": "registration", "seed": seed, "data": {"source": "decathlon", "root": str(root)},
                     "registration": {"adapt_patients": 2, "test_patients": 0.5,
                                      "extra_roots": [str(extra)] if extra else [], **reg}})


def test_pairs_share_modality_and_anatomy(two_folders) -> None:
    a, b = two_folders
    pairs = fixed_pairs(cfg_for(a, b), "train", 200)
    assert {p["anatomy"] for p in pairs} == {"Brain", "Liver"}
    for p in pairs:
        moving, fixed = roles(p)
        # both images come from the folder (anatomy) of the pair's task, in its modality
        folder = a if p["anatomy"] == "Brain" else b
        assert Path(moving["image"]).parent.parent == folder.resolve() == Path(fixed["image"]).parent.parent
        assert p["modality"] == ("MRI" if p["anatomy"] == "Brain" else "CT")
        assert moving["patient_key"] != fixed["patient_key"] and p["inter_subject"]
        assert moving["label"] and fixed["label"]
        assert "synth" not in moving["patient_key"]  # salted hash, not the case name


def test_held_out_patients_never_appear_in_training_pairs(two_folders) -> None:
    a, b = two_folders
    cfg = cfg_for(a, b)
    keys = {split: {c["patient_key"] for p in fixed_pairs(cfg, split, 500) for c in p["cases"]}
            for split in ("train", "adapt", "eval")}
    assert keys["eval"] and keys["adapt"] and keys["train"]
    assert not keys["eval"] & keys["train"]
    assert not keys["adapt"] & keys["train"]
    assert not keys["adapt"] & keys["eval"]
    assert len(keys["adapt"]) == 2 and len(keys["eval"]) == 3  # 10 patients, half held out, 2 to adapt


def test_same_seed_same_pairs_other_seed_other_pairs(two_folders) -> None:
    a, _ = two_folders
    first = fixed_pairs(cfg_for(a), "eval", 6)
    assert first == fixed_pairs(cfg_for(a), "eval", 6)
    assert len(first) == 6
    assert [roles(p)[0]["case_id"] for p in first] != [roles(p)[0]["case_id"] for p in fixed_pairs(cfg_for(a, seed=3),
                                                                                                      "eval", 6)]


def test_training_pairs_are_grouped_by_fixed_image(two_folders) -> None:
    a, _ = two_folders
    pairs = fixed_pairs(cfg_for(a, pairs_per_task=2), "train", 4)
    fixed_ids = [roles(p)[1]["case_id"] for p in pairs]
    assert fixed_ids[0] == fixed_ids[1] and fixed_ids[2] == fixed_ids[3]


def test_intra_subject_pairs_stay_within_one_patient(tmp_path: Path) -> None:
    root = write_synthetic_subjects(tmp_path / "d", n_cases=40, shape=(4, 4, 4))
    # cases synth_000..039: the regex's first group (all digits but the last) makes 4 patients of 10 cases
    cfg = cfg_for(root, pairing="intra", patient_regex=r"synth_(\d\d)\d", adapt_patients=1)
    pairs = fixed_pairs(cfg, "train", 50)
    assert pairs
    for p in pairs:
        moving, fixed = roles(p)
        assert moving["patient_key"] == fixed["patient_key"] and moving["case_id"] != fixed["case_id"]
        assert not p["inter_subject"]


def test_training_tasks_same_for_any_worker_count(two_folders) -> None:
    """Reptile tasks: every inner-step batch of a task holds pairs of one fixed image; 0 or 2 workers agree."""
    from pipeline.common.episodes import episode_loader
    from pipeline.registration.episodes import PairData, RegEpisodes

    a, _ = two_folders
    cfg = validate({**cfg_for(a, inner_steps=2, pairs_per_task=2).__dict__,
                    "transforms": {"volume_size": [8, 8, 8]}})
    data = PairData(cfg, fixed_pairs(cfg, "train"))
    single = list(episode_loader(RegEpisodes(data, cfg, length=4), workers=0))
    multi = list(episode_loader(RegEpisodes(data, cfg, length=4), workers=2))
    assert len(single) == len(multi) == 4
    for task_a, task_b in zip(single, multi, strict=True):
        assert len(task_a) == 2  # one batch per inner step
        for batch_a, batch_b in zip(task_a, task_b, strict=True):
            assert batch_a[0].shape == (2, 1, 8, 8, 8)
            assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b, strict=True) if x is not None)
            # a task is one fixed image: both pairs of the batch share it
            assert torch.equal(batch_a[1][0], batch_a[1][1])
