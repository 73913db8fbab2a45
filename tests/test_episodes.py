"""Episode sampling: class holdout, patient-disjoint support/query, determinism, class minimums."""

import numpy as np
import pytest

from datasets.volume import FewscanError
from pipeline.classification.episodes import EpisodeSampler, split_classes


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


# --- patient split, streaming episodes ------------------------------------------------------------------------------
def test_patient_split_is_seeded_disjoint_and_order_free() -> None:
    from pipeline.common.splits import split_patients

    groups = [f"p{i}" for i in range(50)]
    a = split_patients(groups, validation=0.2, test=0.2, seed=3)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (30, 10, 10)
    assert set(a["train"]) | set(a["validation"]) | set(a["test"]) == set(groups)
    assert not set(a["train"]) & set(a["test"]) and not set(a["validation"]) & set(a["test"])
    assert split_patients(list(reversed(groups)) * 2, 0.2, 0.2, seed=3) == a  # order and repeats do not matter
    assert split_patients(groups, 0.2, 0.2, seed=4) != a
    with pytest.raises(FewscanError, match="cannot be made"):
        split_patients(["p0", "p1"], validation=0.0, test=0.2, seed=0)


def test_make_split_keeps_class_parts_on_their_own_patients() -> None:
    from pipeline.classification.episodes import make_split, split_groups
    from pipeline.common.config import SplitConfig

    labels, groups = toy(patients=60)
    cfg = SplitConfig(novel=["c4", "c5"], validation=["c3"], patients={"validation": 0.2, "test": 0.3})
    split = make_split(cfg, sorted(set(labels)), groups, seed=0)
    base, val, novel = (split_groups(split, p) for p in ("base", "validation", "novel"))
    assert not base & novel and not base & val and not val & novel
    assert split["novel"] == ["c4", "c5"] and len(novel) == 18
    # without a patient split every part may use every patient
    plain = make_split(SplitConfig(novel=["c5"]), sorted(set(labels)), groups, seed=0)
    assert "patients" not in plain and split_groups(plain, "novel") is None
    # no validation patients: validation classes fall back to the train patients
    no_val = make_split(SplitConfig(validation=["c3"], patients={"test": 0.2}), sorted(set(labels)), groups, 0)
    assert split_groups(no_val, "validation") == split_groups(no_val, "base")


def test_episode_stream_is_identical_for_0_and_2_workers() -> None:
    import torch

    from pipeline.classification.episodes import EpisodeDataset
    from pipeline.common.episodes import episode_loader

    labels, groups = toy(patients=30)
    x = torch.arange(len(labels), dtype=torch.float32).reshape(-1, 1, 1, 1)  # item i holds the value i
    ds = EpisodeDataset(x, labels, groups, sorted(set(labels)), ways=3, shots=2, queries=1, seed=7, length=6)
    single = list(episode_loader(ds, workers=0))
    multi = list(episode_loader(ds, workers=2, prefetch=2))
    assert len(single) == len(multi) == 6
    for (sx, sy, qx, qy), (mx, my, mqx, mqy) in zip(single, multi, strict=True):
        assert torch.equal(sx, mx) and torch.equal(sy, my) and torch.equal(qx, mqx) and torch.equal(qy, mqy)
    for n, (sx, sy, qx, qy) in enumerate(single):
        ep = ds.episode(n)
        assert sx.ravel().long().tolist() == list(ep.support) and qx.ravel().long().tolist() == list(ep.query)
        assert not {groups[i] for i in ep.support} & {groups[i] for i in ep.query}
        assert sy.tolist() == [0, 0, 1, 1, 2, 2] and qy.tolist() == [0, 1, 2]
    assert len({ds.episode(n) for n in range(6)}) > 1
    # resuming at episode 4 gives the tail of the same stream
    tail = EpisodeDataset(x, labels, groups, sorted(set(labels)), ways=3, shots=2, queries=1, seed=7, length=6,
                          start=4)
    assert [b[0].ravel().tolist() for b in episode_loader(tail, workers=2)] == [b[0].ravel().tolist()
                                                                                 for b in single[4:]]


def test_episode_stream_augments_only_when_asked() -> None:
    import torch

    from pipeline.classification.episodes import EpisodeDataset
    from transforms.augment import build_augmenter
    from transforms.config import AugmentConfig

    labels, groups = toy(patients=30)
    x = torch.rand(len(labels), 1, 8, 8)
    kwargs = {"ways": 2, "shots": 1, "queries": 1, "seed": 1, "length": 3}
    plain = list(EpisodeDataset(x, labels, groups, sorted(set(labels)), **kwargs))
    aug = build_augmenter(AugmentConfig(enabled=True, prob=1.0), spatial_dims=2)
    augmented = list(EpisodeDataset(x, labels, groups, sorted(set(labels)), augment=aug, **kwargs))
    again = list(EpisodeDataset(x, labels, groups, sorted(set(labels)), augment=aug, **kwargs))
    for (sx, _, qx, _), (ax, _, aqx, _), (bx, _, bqx, _) in zip(plain, augmented, again, strict=True):
        assert not torch.allclose(sx, ax) and not torch.allclose(qx, aqx)
        assert torch.equal(ax, bx) and torch.equal(aqx, bqx)  # the random part is seeded per episode


def test_class_minimum_counts_patients_not_items(caplog: pytest.LogCaptureFixture) -> None:
    """12 items from 3 patients cannot guarantee 2 support + 2 query patients: excluded up front, with a warning."""
    labels = ["many"] * 12 + ["a"] * 4 + ["b"] * 4
    groups = [f"m{i % 3}" for i in range(12)] + [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]
    sampler = EpisodeSampler(labels, groups, ["many", "a", "b"], ways=2, shots=2, queries=2, seed=0)
    assert sorted(sampler.by_class) == ["a", "b"] and "'many' excluded: 12 items from 3 patients" in caplog.text
    for _ in range(50):  # every draw succeeds (a and b have exactly K+Q patients)
        ep = sampler.sample(max_tries=1)
        assert not {groups[i] for i in ep.support} & {groups[i] for i in ep.query}
