"""Episode sampling: class holdout, patient-disjoint support/query, determinism, class minimums."""

import numpy as np
import pytest

from datasets.volume import FewscanError
from pipeline.episodes import EpisodeSampler, split_classes


def toy(n_classes: int = 6, patients: int = 12, per_patient: int = 2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Items: each patient has `per_patient` items of random classes."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(patients):
        for _ in range(per_patient):
            labels.append(f"c{rng.integers(n_classes)}")
            groups.append(f"p{p}")
    return labels, groups


def test_split_holds_out_novel_and_validation() -> None:
    split = split_classes(["a", "b", "c", "d"], novel=["d"], validation=["c"])
    assert split == {"base": ["a", "b"], "validation": ["c"], "novel": ["d"]}
    with pytest.raises(FewscanError, match="not in the data"):
        split_classes(["a"], novel=["zz"], validation=[])


def test_training_episodes_never_show_novel_classes_or_share_patients() -> None:
    labels, groups = toy(patients=40)
    split = split_classes(sorted(set(labels)), novel=["c4", "c5"], validation=[])
    sampler = EpisodeSampler(labels, groups, split["base"], ways=3, shots=2, queries=2, seed=1)
    for _ in range(300):
        ep = sampler.sample()
        shown = {labels[i] for i in (*ep.support, *ep.query)}
        assert shown == set(ep.classes) and not shown & {"c4", "c5"}
        assert not {groups[i] for i in ep.support} & {groups[i] for i in ep.query}
        # class-major layout: labels of the episode follow the class order
        sy, qy = ep.labels(2, 2)
        assert [labels[i] for i in ep.support] == [ep.classes[k] for k in sy]
        assert [labels[i] for i in ep.query] == [ep.classes[k] for k in qy]


def test_same_seed_same_episodes_other_seed_differs() -> None:
    labels, groups = toy(patients=40)
    classes = sorted(set(labels))
    a = EpisodeSampler(labels, groups, classes, 3, 1, 2, seed=5).fixed(20)
    b = EpisodeSampler(labels, groups, classes, 3, 1, 2, seed=5).fixed(20)
    c = EpisodeSampler(labels, groups, classes, 3, 1, 2, seed=6).fixed(20)
    assert a == b and a != c


def test_class_below_minimum_is_excluded_not_crashed(caplog: pytest.LogCaptureFixture) -> None:
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 10 + ["rare"] * 2
    groups = [f"p{i}" for i in range(32)]
    sampler = EpisodeSampler(labels, groups, ["a", "b", "c", "rare"], ways=2, shots=2, queries=2, seed=0)
    assert "rare" not in sampler.by_class and "excluded" in caplog.text
    with pytest.raises(FewscanError, match="4-way"):
        EpisodeSampler(labels, groups, ["a", "b", "c", "rare"], ways=4, shots=2, queries=2)


def test_single_patient_class_cannot_form_disjoint_episode() -> None:
    labels = ["a"] * 6 + ["b"] * 6
    groups = ["p0"] * 6 + [f"q{i}" for i in range(6)]
    with pytest.raises(FewscanError):
        EpisodeSampler(labels, groups, ["a", "b"], ways=2, shots=1, queries=1)
