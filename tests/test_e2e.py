"""End to end on a tiny synthetic cohort: synth -> index -> train -> evaluate through the CLI."""

import json
from pathlib import Path

import pytest

from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    assert main(["synth", str(out), "--patients", "16", "--seed", "1"]) == 0
    return out


@pytest.mark.slow
def test_train_then_evaluate_writes_report_contract(cohort: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={cohort}",
                 "--out", str(run)]) == 0
    for name in ["config.yaml", "manifest.csv", "split.json", "untrained.safetensors", "model.safetensors",
                 "curves.json", "learning_curve.png"]:
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert set(split["novel"]).isdisjoint(split["base"])

    assert main(["evaluate", str(run)]) == 0
    assert "trained" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "classification" and report["method"] == "protonet"
    assert report["episodes"] == 10 and report["chance"] == pytest.approx(0.5)
    for block in (report["metrics"], report["untrained"]["metrics"]):
        acc = block["accuracy"]
        assert 0.0 <= acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1] <= 1.0
    assert set(report["classes"]) == set(split["novel"])
    # per-episode accuracies (for pairing runs on one episode set) and per-class CIs inside [0, 1]
    per = report["per_episode"]["accuracy"]
    assert set(per) == {"trained", "untrained", "finetune"} and len(per["trained"]) == 10
    assert sum(per["trained"]) / 10 == pytest.approx(report["metrics"]["accuracy"]["mean"])
    assert all(0.0 <= c["recall"]["ci95"][0] and c["recall"]["ci95"][1] <= 1.0 for c in report["per_class"].values())
    assert (run / "accuracy.png").stat().st_size > 1000
    # the trained encoder under a new linear head, and the method minus it and minus the untrained weights,
    # episode by episode
    assert set(report["paired"]) == {"untrained", "baseline_finetune"}
    ft = report["baseline_finetune"]["metrics"]["accuracy"]
    assert 0.0 <= ft["ci95"][0] <= ft["mean"] <= ft["ci95"][1] <= 1.0
    for key in ("untrained", "baseline_finetune"):
        gap = report["paired"][key]["accuracy"]
        theirs = report[key]["metrics"]["accuracy"]["mean"]
        assert gap["mean"] == pytest.approx(report["metrics"]["accuracy"]["mean"] - theirs) and gap["n"] == 10

    # Same run evaluated again reuses the fixed episodes and gives identical numbers.
    first = report["metrics"]["accuracy"]["mean"]
    assert main(["evaluate", str(run), "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"]["accuracy"]["mean"] == first

    # The same weights at another K: own episode set and report; the run's own are neither reused nor changed.
    own = (run / "report.json").read_bytes(), (run / "episodes.json").read_bytes()
    assert report["shots"] == 2
    assert main(["evaluate", str(run), "--set", "shots=1", "--set", "train.device=cpu"]) == 0
    assert "report_shots1.json" in capsys.readouterr().out
    at1 = json.loads((run / "report_shots1.json").read_text())
    assert at1["shots"] == 1 and at1["episodes"] == 10 and (run / "accuracy_shots1.png").is_file()
    record = json.loads((run / "episodes_shots1.json").read_text())[0]
    assert sum(c["role"] == "support" for c in record["cases"]) == 1 * report["ways"]
    assert ((run / "report.json").read_bytes(), (run / "episodes.json").read_bytes()) == own


def test_evaluate_set_refuses_what_training_fixed(cohort: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={cohort}",
                 "--set", "train.iterations=1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--set", "model.encoder=resnet10"]) == 2
    err = capsys.readouterr().err
    assert "model.encoder" in err and "can change after training" in err and "Traceback" not in err
    assert not (run / "report.json").exists() and not list(run.glob("report_*"))


def test_training_is_reproducible(cohort: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    args = ["--set", f"data.root={cohort}", "--set", "train.iterations=3"]
    for name in ("a", "b"):
        assert main(["train", str(REPO / "configs" / "smoke.yaml"), *args, "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_evaluate_on_missing_run_is_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
