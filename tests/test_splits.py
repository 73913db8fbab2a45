"""One patient-split scheme for every task kind, and salted patient keys (FEWSCAN_SALT) for all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.index import patient_key
from datasets.synth_decathlon import write_synthetic_subjects
from datasets.volume import FewscanError, Volume
from pipeline.common.config import validate
from pipeline.common.splits import assign_patients, rank_patients, split_patients
from pipeline.registration.episodes import patient_groups, registration_tasks
from pipeline.segmentation.data import Case, make_case
from pipeline.segmentation.data import split_patients as split_cases


def test_assign_patients_deals_disjoint_parts_in_rank_order() -> None:
    keys = [f"k{i}" for i in range(20)]
    parts = assign_patients(keys + keys[:5], {"adapt": 3, "eval": 4}, seed=1)
    assert list(parts) == ["train", "adapt", "eval"]
    assert (len(parts["adapt"]), len(parts["eval"]), len(parts["train"])) == (3, 4, 13)
    assert sorted(parts["train"] + parts["adapt"] + parts["eval"]) == sorted(keys)  # disjoint, nobody lost
    ranked = rank_patients(keys, 1)
    assert parts["adapt"] == sorted(ranked[:3]) and parts["eval"] == sorted(ranked[3:7])
    assert assign_patients(list(reversed(keys)), {"adapt": 3, "eval": 4}, seed=1) == parts  # order-free
    assert assign_patients(keys, {"adapt": 3, "eval": 4}, seed=2) != parts
    with pytest.raises(FewscanError, match="cannot deal"):
        assign_patients(keys[:4], {"adapt": 3, "eval": 2}, seed=1)


def test_a_patient_keeps_its_place_when_others_are_added() -> None:
    few, more = [f"k{i}" for i in range(10)], [f"k{i}" for i in range(30)]
    ranked_more = rank_patients(more, 5)
    assert rank_patients(few, 5) == [k for k in ranked_more if k in few]


def test_classification_split_is_the_same_ranking_cut_test_first() -> None:
    keys = [f"p{i}" for i in range(40)]
    parts = split_patients(keys, validation=0.25, test=0.25, seed=9)
    ranked = rank_patients(keys, 9)
    assert parts["test"] == sorted(ranked[:10]) and parts["validation"] == sorted(ranked[10:20])


def _case(case_id: str, labelled: bool = True) -> Case:
    image = np.zeros((4, 4, 4), np.float32)
    return Case(case_id, patient_key(case_id), image, np.eye(4), np.ones((4, 4, 4), np.int16) if labelled else None)


def test_segmentation_holds_out_labelled_patients_by_the_shared_ranking() -> None:
    cases = [_case(f"c{i}") for i in range(10)] + [_case(f"u{i}", labelled=False) for i in range(3)]
    train, test = split_cases(cases, 0.3, seed=4)
    test_keys = {c.patient_key for c in test}
    assert test_keys == set(rank_patients([c.patient_key for c in cases[:10]], 4)[:3])
    assert not test_keys & {c.patient_key for c in train}
    assert all(c.label is None or c.patient_key not in test_keys for c in train) and len(train) == 10
    assert split_cases(cases, 0.0, seed=4) == (cases, cases)  # transductive: every scan on both sides


@pytest.fixture(scope="module")
def reg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_subjects(tmp_path_factory.mktemp("reg") / "Brain", n_cases=12, shape=(4, 4, 4))


def _reg_cfg(root: Path, **reg):
    return validate({"task": "registration", "seed": 3, "data": {"source": "decathlon", "root": str(root)},
                     "registration": {"adapt_patients": 2, "test_patients": 0.4, **reg}})


def test_registration_groups_are_disjoint_and_the_shared_ranking(reg_root: Path) -> None:
    cfg = _reg_cfg(reg_root)
    task = registration_tasks(cfg)[0]
    groups = patient_groups(task, cfg)
    keys = sorted({c.patient_key for c in task.cases})
    assert sorted(groups["train"] + groups["adapt"] + groups["eval"]) == keys
    ranked = rank_patients(keys, 3)
    assert groups["adapt"] == sorted(ranked[:2]) and groups["eval"] == sorted(ranked[2:5])  # round(0.4 * 12) held


def test_segmentation_and_registration_keys_honour_fewscan_salt(monkeypatch: pytest.MonkeyPatch,
                                                                reg_root: Path) -> None:
    tcfg = validate({"task": "segmentation", "transforms": {"preset": "mr"}}).transforms
    image = Volume(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), np.eye(4))
    cfg = _reg_cfg(reg_root)
    keys = {}
    for salt in ("first-secret", "second-secret"):
        monkeypatch.setenv("FEWSCAN_SALT", salt)
        seg = make_case("case_007", image, None, {}, tcfg).patient_key
        assert seg == patient_key("case_007", salt)
        reg = {c.case_id: c.patient_key for c in registration_tasks(cfg)[0].cases}
        assert reg["synth_003"] == patient_key("SynthBrain/synth_003", salt)
        keys[salt] = (seg, reg)
    assert keys["first-secret"][0] != keys["second-secret"][0]
    assert not set(keys["first-secret"][1].values()) & set(keys["second-secret"][1].values())
