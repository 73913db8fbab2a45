"""End to end: train + evaluate the registration task on a generated Decathlon folder; the report contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_evaluate_set_is_refused_for_registration_runs(folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    run = train(validate(tiny_config(folder, adapt_steps=0, baseline="none")), tmp_path / "run")
    assert main(["evaluate", str(run), "--set", "shots=2"]) == 2
    err = capsys.readouterr().err
    assert "registration runs are scored on the pairs fixed at training" in err and "Traceback" not in err
    assert not (run / "report.json").exists()
