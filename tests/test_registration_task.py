"""End to end: train + evaluate the registration task on a generated Decathlon folder; the report contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from datasets.synth_decathlon import write_synthetic_subjects
from pipeline.common.config import validate
from pipeline.registration.evaluate import evaluate, summary_table
from pipeline.registration.train import train


def tiny_config(root: Path, **reg) -> dict:
    return {"task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
            "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]},
            "train": {"iterations": 3, "lr": 1e-3, "log_every": 1},
            "registration": {"test_patients": 0.5, "adapt_patients": 2, "train_pairs": 8, "pairs_per_task": 2,
                             "eval_pairs": 3, "adapt_pairs": 2, "features": 4, "levels": 2, "inner_steps": 2,
                             "adapt_steps": 2, "baseline": "affine+demons", "baseline_affine": False, **reg}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_subjects(tmp_path_factory.mktemp("dec") / "Task", n_cases=10, shape=(18, 16, 15))


def test_train_evaluate_writes_the_report_contract(folder: Path, tmp_path: Path) -> None:
    run = train(validate(tiny_config(folder)), tmp_path / "run")
    for name in ("config.yaml", "split.json", "pairs.json", "model.safetensors", "untrained.safetensors"):
        assert (run / name).is_file(), name
    report = evaluate(run)
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["task"] == "registration" and report["method"] == "reptile+localnet"
    assert report["pairs"] == report["episodes"] == 3
    for block in (report, report["unregistered"], report["baseline_sitk"], report["meta_init"]):
        for name in ("dice", "folding"):
            m = block["metrics"][name]
            assert 0.0 <= m["mean"] <= 1.0 and m["ci95"][0] <= m["mean"] <= m["ci95"][1]
        assert set(block["per_structure"]) <= {"core", "shell"}
    assert report["unregistered"]["metrics"]["folding"]["mean"] == 0.0  # identity never folds
    assert report["baseline_sitk"]["kind"] == "affine+demons"
    # paired comparison: per-pair Dice of fewscan minus the baseline's, on the same 3 pairs
    ours, theirs = report["per_pair"]["dice"], report["baseline_sitk"]["per_pair"]["dice"]
    assert len(ours) == len(theirs) == 3
    assert report["metrics"]["dice"]["mean"] == pytest.approx(sum(ours) / 3)
    diff = report["paired"]["baseline_sitk"]["dice"]
    assert diff["mean"] == pytest.approx(sum(a - b for a, b in zip(ours, theirs, strict=True)) / 3)
    assert "Dice" in summary_table(report) and "paired Dice" in summary_table(report)


def test_joint_training_sitk_prealign_and_diffeomorphic_voxelmorph_run(folder: Path, tmp_path: Path) -> None:
    cfg = validate(tiny_config(folder, meta="joint", prealign="sitk", network="voxelmorph", diffeomorphic=True,
                               instance_steps=1, adapt_steps=0, baseline="none"))
    report = evaluate(train(cfg, tmp_path / "run"))
    assert report["method"] == "joint+voxelmorph"
    assert "baseline_sitk" not in report and "meta_init" not in report
    assert report["metrics"]["seconds"]["mean"] > 0  # includes the SimpleITK affine pre-alignment


@pytest.fixture()
def fast_run(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A run without adaptation or SimpleITK baseline (fast to evaluate), and its config file."""
    config = tmp_path / "reg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(folder, adapt_steps=0, baseline="none")))
    return train(validate(yaml.safe_load(config.read_text())), tmp_path / "run"), config


def test_evaluate_set_changes_test_time_adaptation_into_tagged_files(fast_run: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    run, _ = fast_run
    assert main(["evaluate", str(run), "--set", "shots=2"]) == 2  # training keys and other kinds' keys: refused
    err = capsys.readouterr().err
    assert "evaluate --set episodes.shots: only registration.instance_steps" in err and "Traceback" not in err
    assert main(["evaluate", str(run), "--set", "registration.features=8"]) == 2
    assert "registration.features" in capsys.readouterr().err and not list(run.glob("report*"))
    assert main(["evaluate", str(run), "--set", "train.threads=1"]) == 0  # runtime keys: the run's own report
    own = json.loads((run / "report.json").read_text())
    assert main(["evaluate", str(run), "--set", "registration.instance_steps=2", "registration.instance_lr=0.01",
                 "train.device=cpu"]) == 0
    tag = "instance_steps2_instance_lr0.01"
    assert f"report_{tag}.json" in capsys.readouterr().out
    tuned = json.loads((run / f"report_{tag}.json").read_text())
    assert json.loads((run / "report.json").read_text()) == own  # the run's own report is not overwritten
    # per-pair optimisation moved the field: its smoothness changed, the unregistered pairs did not
    assert tuned["metrics"]["log_jac_std"]["mean"] != own["metrics"]["log_jac_std"]["mean"]
    assert tuned["unregistered"] == own["unregistered"]


def test_evaluate_episodes_scores_exactly_the_pairs_of_the_file(fast_run: tuple[Path, Path], tmp_path: Path,
                                                                refuses_episode_files) -> None:
    from pipeline.__main__ import main
    from pipeline.common.episodes import load_episode_set, save_episode_set
    from pipeline.registration.episodes import PairData
    from pipeline.registration.evaluate import _identity_rows

    run, config = fast_run
    written = tmp_path / "eval.json"
    assert main(["episodes", str(config), "--split", "novel", "--n", "3", "--out", str(written)]) == 0
    stored = json.loads((run / "pairs.json").read_text())["eval"]
    assert load_episode_set(written) == stored  # the verb writes the pairs training fixed
    chosen = tmp_path / "chosen.json"
    save_episode_set([stored[2], stored[0]], chosen)
    assert main(["evaluate", str(run), "--episodes", str(chosen)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["pairs"] == 2 and load_episode_set(run / "episodes.json") == [stored[2], stored[0]]
    cfg = validate(yaml.safe_load(config.read_text()))
    expected = [r["dice"] for r in _identity_rows(PairData(cfg, [stored[2], stored[0]]))]
    assert report["unregistered"]["per_pair"]["dice"] == pytest.approx(expected)
    assert expected != [r["dice"] for r in _identity_rows(PairData(cfg, stored[:2]))]  # the order tells them apart
    train_pairs, moved, other = tmp_path / "train.json", tmp_path / "moved.json", tmp_path / "classification.json"
    assert main(["episodes", str(config), "--split", "base", "--n", "1", "--out", str(train_pairs)]) == 0
    save_episode_set([{**stored[0], "channel": 3}], moved)
    save_episode_set([{"task": "classification", "cases": [{"role": "support", "case_id": "a"}]}], other)
    refuses_episode_files(run, [(train_pairs, "is not a held-out (eval) case"), (moved, "pair 0: channel 3"),
                                (other, "classification episode, not registration")])
