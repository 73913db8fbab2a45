"""Fixed evaluation episode files: format, the `episodes` verb, evaluation reproducing them, task dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from datasets.volume import FewscanError, InputError
from pipeline.__main__ import main
from pipeline.classification.data import open_source
from pipeline.classification.episodes import classification_episodes as fixed_episodes
from pipeline.classification.episodes import evaluation_episodes, records_to_episodes, split_groups
from pipeline.common.config import load_config
from pipeline.common.episodes import load_episode_set, save_episode_set


@pytest.fixture()
def npz_config(tmp_path: Path) -> Path:
    """A 6-class npz with 2 images per patient and a config holding out 2 classes and 30% of patients."""
    rng = np.random.default_rng(0)
    n = 240
    labels = np.arange(n) % 6
    np.savez(tmp_path / "toy.npz", images=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), labels=labels,
             groups=np.array([f"pt{i // 2}" for i in range(n)]),
             class_names=np.array(["a", "b", "c", "d", "e", "f"]))
    cfg = {"task": "classification", "seed": 3, "data": {"source": "npz", "root": str(tmp_path / "toy.npz")},
           "split": {"novel": ["e", "f"], "validation": ["d"], "patients": {"test": 0.3, "validation": 0.2}},
           "episodes": {"ways": 2, "shots": 2, "queries": 3, "eval_episodes": 12}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def test_episodes_verb_writes_the_documented_format(npz_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "episodes.json"
    assert main(["episodes", str(npz_config), "--split", "novel", "--out", str(out), "--n", "7"]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 7
    cfg = load_config(npz_config)
    source = open_source(cfg)
    cat = source.catalog()
    patient_of = dict(zip(cat.ids, cat.groups, strict=True))
    class_of = dict(zip(cat.ids, cat.labels, strict=True))
    from pipeline.classification.episodes import source_split

    test_patients = split_groups(source_split(cfg, source), "novel")
    for rec in records:
        assert rec["task"] == "classification" and rec["split"] == "novel" and set(rec["classes"]) <= {"e", "f"}
        roles = [c["role"] for c in rec["cases"]]
        assert roles.count("support") == 2 * 2 and roles.count("query") == 2 * 3
        for case in rec["cases"]:
            assert set(case) == {"role", "case_id", "patient_key", "class"}
            assert patient_of[case["case_id"]] == case["patient_key"] and class_of[case["case_id"]] == case["class"]
            assert case["patient_key"] in test_patients  # novel episodes only use test patients
        support = {c["patient_key"] for c in rec["cases"] if c["role"] == "support"}
        query = {c["patient_key"] for c in rec["cases"] if c["role"] == "query"}
        assert not support & query
    # same config -> byte-identical file; another seed -> different episodes
    again = tmp_path / "again.json"
    main(["episodes", str(npz_config), "--out", str(again), "--n", "7"])
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.json"
    main(["episodes", str(npz_config), "--set", "seed=4", "--out", str(other), "--n", "7"])
    assert json.loads(other.read_text()) != records


def test_evaluation_uses_the_same_episodes_as_the_verb(npz_config: Path, tmp_path: Path) -> None:
    """What `evaluate` draws for a run equals what `episodes` writes for its config: one file, paired methods."""
    cfg = load_config(npz_config)
    records = fixed_episodes(cfg, "novel", cfg.episodes.eval_episodes)
    assert len(records) == cfg.episodes.eval_episodes
    source = open_source(cfg)
    from pipeline.classification.episodes import source_split

    split = source_split(cfg, source)
    items = source.items(split["novel"], split_groups(split, "novel"))
    run_dir = tmp_path / "run"
    drawn = evaluation_episodes(cfg, split, items.labels, items.groups, items.ids, run_dir / "episodes.json")
    assert load_episode_set(run_dir / "episodes.json") == records
    # an explicit episode file wins, is copied into the run, and maps to the same items
    save_episode_set(records[:3], tmp_path / "three.json")
    chosen = evaluation_episodes(cfg, split, items.labels, items.groups, items.ids, run_dir / "episodes.json",
                                 tmp_path / "three.json")
    assert chosen == drawn[:3] and len(load_episode_set(run_dir / "episodes.json")) == 3
    for ep, rec in zip(chosen, records, strict=False):
        assert [items.ids[i] for i in ep.support] == [c["case_id"] for c in rec["cases"] if c["role"] == "support"]
        assert set(ep.classes) <= set(split["novel"])


def test_records_are_checked_against_the_data_and_config(tmp_path: Path) -> None:
    rec = {"task": "classification", "classes": ["a", "b"], "cases": [
        {"role": "support", "case_id": "1", "patient_key": "k1", "class": "a"},
        {"role": "support", "case_id": "2", "patient_key": "k2", "class": "b"},
        {"role": "query", "case_id": "3", "patient_key": "k3", "class": "a"},
        {"role": "query", "case_id": "4", "patient_key": "k4", "class": "b"}]}
    ids = ["4", "3", "2", "1"]
    (ep,) = records_to_episodes([rec], ids, shots=1, queries=1)
    assert ep.classes == ("a", "b") and ep.support == (3, 2) and ep.query == (1, 0)
    with pytest.raises(InputError, match="config asks for 2"):
        records_to_episodes([rec], ids, shots=2, queries=1)
    with pytest.raises(InputError, match="not in this data"):
        records_to_episodes([rec], ["1", "2", "3"], shots=1, queries=1)
    with pytest.raises(InputError, match="not classification"):
        records_to_episodes([{**rec, "task": "segmentation"}], ids, 1, 1)
    (tmp_path / "bad.json").write_text(json.dumps([{"classes": ["a"], "support": [0], "query": [1]}]))
    with pytest.raises(InputError, match="lacks 'task'"):
        load_episode_set(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="non-empty"):
        load_episode_set(tmp_path / "empty.json")


def test_class_minimums_are_reported_not_crashed(npz_config: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Too few test patients for 3+3 per class: the classes are excluded with a warning, then a clear error."""
    code = main(["episodes", str(npz_config), "--set", "shots=30", "--out", str(tmp_path / "x.json")])
    assert code == 2 and "excluded" in caplog.text and not (tmp_path / "x.json").exists()


def test_unknown_split_and_task_are_refused(npz_config: Path, tmp_path: Path) -> None:
    from pipeline.__main__ import task_module

    cfg = load_config(npz_config)
    with pytest.raises(FewscanError, match="splits are"):
        fixed_episodes(cfg, "test", 2)
    with pytest.raises(FewscanError, match="unknown task"):
        task_module("detection")


@pytest.mark.realdata
def test_mednist_episodes_hold_out_two_classes(shared_data: Path, tmp_path: Path) -> None:
    import torch

    from pipeline.classification.episodes import EpisodeDataset, source_split

    path = shared_data / "mednist" / "mednist_64px_cap1000.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cfg_file = tmp_path / "mednist.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data": {"source": "npz", "root": str(path)}, "split": {"novel": ["Hand", "HeadCT"]},
        "episodes": {"ways": 2, "shots": 5, "queries": 5, "eval_episodes": 20}}))
    out = tmp_path / "episodes.json"
    assert main(["episodes", str(cfg_file), "--out", str(out)]) == 0
    records = load_episode_set(out)
    assert len(records) == 20 and all(sorted(r["classes"]) == ["Hand", "HeadCT"] for r in records)
    cfg = load_config(cfg_file)
    source = open_source(cfg)
    assert source.classes == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    split = source_split(cfg, source)
    base = source.items(split["base"])
    assert base.x.shape == (4000, 1, 64, 64) and base.x.dtype == torch.float32
    stream = EpisodeDataset(base.x, base.labels, base.groups, split["base"], ways=4, shots=5, queries=5, length=20)
    for n in range(20):
        assert not set(stream.episode(n).classes) & {"Hand", "HeadCT"}


def test_set_takes_several_pairs_per_flag(npz_config: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["episodes", str(npz_config), "--set", "seed=4", "shots=1", "--n", "3", "--out", str(one)]) == 0
    assert main(["episodes", str(npz_config), "--set", "seed=4", "--set", "shots=1", "--n", "3", "--out",
                 str(two)]) == 0
    assert one.read_bytes() == two.read_bytes()
    records = json.loads(one.read_text())
    assert all(r["shots"] == 1 for r in records)  # the second pair of the flag took effect
    default = fixed_episodes(load_config(npz_config, ["shots=1"]), "novel", 3)
    assert records != default  # and so did the first (seed 4, not the config's 3)
    with pytest.raises(SystemExit) as exit_info:  # a positional swallowed by --set is refused, not misread
        main(["episodes", "--set", "seed=4", str(npz_config), "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.json").exists()


@pytest.fixture()
def npz_run(npz_config: Path, tmp_path: Path) -> Path:
    """A classification run trained for 2 iterations on the toy npz, through the CLI."""
    run = tmp_path / "run"
    assert main(["train", str(npz_config), "--set", "model.encoder=conv4_2d", "model.filters=4",
                 "model.norm_groups=2", "transforms.image_size=[16, 16]", "train.iterations=2", "train.val_every=0",
                 "train.tensorboard=false", "train.device=cpu", "--out", str(run)]) == 0
    return run


def test_evaluate_episodes_file_through_the_cli(npz_config: Path, npz_run: Path, tmp_path: Path,
                                                refuses_episode_files) -> None:
    chosen = tmp_path / "chosen.json"
    assert main(["episodes", str(npz_config), "--n", "5", "--out", str(chosen)]) == 0
    save_episode_set(load_episode_set(chosen)[::-1], chosen)  # not the run's own set (12 episodes) nor its order
    assert main(["evaluate", str(npz_run), "--episodes", str(chosen)]) == 0
    report = json.loads((npz_run / "report.json").read_text())
    assert report["episodes"] == 5 and load_episode_set(npz_run / "episodes.json") == load_episode_set(chosen)
    wrong_shots, wrong_task, unknown = (tmp_path / n for n in ("shots.json", "task.json", "unknown.json"))
    assert main(["episodes", str(npz_config), "--n", "2", "--set", "shots=1", "--out", str(wrong_shots)]) == 0
    records = load_episode_set(chosen)
    wrong_task.write_text(json.dumps([{"structure": "liver", "cases": [{"role": "support", "case_id": "x"}]}]))
    unknown.write_text(json.dumps([{**records[0], "cases": [{**c, "case_id": "nope"} for c in records[0]["cases"]]}]))
    refuses_episode_files(npz_run, [(wrong_shots, "config asks for 2"), (unknown, "'nope' is not in this data"),
                                    (wrong_task, "segmentation episode, not classification")])
