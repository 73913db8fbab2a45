"""End to end: self-supervised training and evaluation on a generated Decathlon folder give the report contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.seg_io import write_synthetic_decathlon
from pipeline.segment import evaluate, summary_table, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.iterations=3", "train.log_every=1", "episodes.eval_episodes=1", "segmentation.finetune_steps=2",
        "segmentation.channels=[8, 16]", "segmentation.features=8", "segmentation.crop=[16, 16, 16]",
        "segmentation.test_patients=0.5", "segmentation.n_supervoxels=20", "segmentation.overlays=1",
        "segmentation.threads=1"]


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory) -> Path:
    return write_synthetic_decathlon(tmp_path_factory.mktemp("dec") / "Task99", n_cases=6, shape=(20, 24, 16),
                                     unlabelled=1)


def _check_block(block: dict, structures: list[str]) -> None:
    for metric in ("dice", "hd95"):
        m = block["metrics"][metric]
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert 0 <= block["metrics"]["dice"]["mean"] <= 1
    assert sorted(block["per_structure"]) == structures
    for s in structures:
        assert set(block["per_structure"][s]) == {"dice", "hd95"}
        assert {"mean", "ci95"} <= set(block["per_structure"][s]["dice"])


@pytest.mark.parametrize("overrides", [
    ["segmentation.mode=2d", "segmentation.method=proto", "segmentation.baselines=[finetune]"],
    ["segmentation.mode=3d", "segmentation.method=maml", "segmentation.baselines=[]", "shots=1"],
])
def test_ssl_train_evaluate_report_contract(decathlon: Path, tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(REPO / "configs" / "segment_decathlon_ssl.yaml", [f"data.root={decathlon}", *TINY, *overrides])
    run = train(cfg, tmp_path / "run")
    report = evaluate(run)
    structures = ["kidney", "liver", "spleen"]
    assert report["task"] == "segmentation" and report["method"] == cfg.segmentation.method
    assert report["shots"] == cfg.episodes.shots and report["episodes"] == 3
    _check_block(report, structures)
    _check_block(report["untrained"], structures)
    for name in cfg.segmentation.baselines:
        _check_block(report[f"baseline_{name}"], structures)
    assert (run / "report.json").is_file() and (run / "dice.png").is_file() and list(run.glob("overlay_*.png"))
    assert "Dice" in summary_table(report)
    if cfg.segmentation.mode == "2d":  # fixed episodes and seeded fine-tuning: re-evaluation is identical
        assert evaluate(run)["metrics"] == report["metrics"]
