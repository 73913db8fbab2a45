"""The README's walkthroughs, run block by block exactly as written (only a tiny training schedule is appended to
each `train` line), in a fresh folder, through bash."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# appended to every `python -m pipeline train` line: the walkthroughs' schedules take minutes
TINY = {
    "configs/base.yaml": "--set train.iterations=2 episodes.eval_episodes=4 model.channels=[4,8]",
    "configs/segment_propagate.yaml": "--set train.iterations=2 episodes.eval_episodes=2 "
                                      "registration.instance_steps=2 registration.features=4",
}


def walkthrough(name: str) -> list[str]:
    """The command lines of README block `<!-- walkthrough: NAME -->`."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- walkthrough: {name} -->\n```bash\n(.*?)```", text, re.S)
    assert match, f"README has no walkthrough {name!r}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def run_block(name: str, cwd: Path) -> str:
    """Run one walkthrough in `cwd` with this interpreter as `python`; returns its output, fails on any error."""
    lines = []
    for line in walkthrough(name):
        for config, extra in TINY.items():
            if "python -m pipeline train" in line and config in line:
                line = re.sub(r"\s+#.*$", "", line) + " " + extra
        lines.append(line)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"walkthrough {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("walk")
    (cwd / "configs").symlink_to(REPO / "configs")  # the blocks name configs/ relative to the repository root
    return cwd


@pytest.mark.slow
def test_walkthrough_train_then_adapt(folder: Path) -> None:
    out = run_block("train", folder)
    run = folder / "runs" / "lesions"
    report = json.loads((run / "report.json").read_text())
    assert set(report["classes"]) == {"spiculated_mass", "cavitary_lesion", "ground_glass_nodule"}
    assert report["episodes"] == 4 and "trained" in out
    assert "<html" in (run / "report.html").read_text()[:500].lower() and "runs/lesions/report.html" in out
    with (folder / "data" / "cohort-manifest.csv").open() as f:
        assert len(list(csv.DictReader(f))) >= 60  # one row per series and finding of the synthetic cohort

    run_block("adapt", folder)
    adapted = json.loads((folder / "runs" / "new-types" / "adapted.json").read_text())
    assert sorted(adapted["classes"]) == sorted(report["classes"])
    with (folder / "runs" / "new-types" / "predictions" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9  # 3 queries of each new type
    bundle = folder / "runs" / "new-types-bundle"
    assert (bundle / "models" / "model.ts").is_file() and (bundle / "configs" / "inference.json").is_file()
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in adapted["classes"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and row["prediction"] in adapted["classes"]


@pytest.mark.slow
def test_walkthrough_segment(folder: Path) -> None:
    if not (folder / "data" / "cohort").is_dir():  # run alone: the cohort of walkthrough 1
        subprocess.run([sys.executable, "-m", "pipeline", "synth", str(folder / "data" / "cohort")], cwd=REPO,
                       check=True, capture_output=True)
    run_block("segment", folder)
    run = folder / "runs" / "organs"
    one, three = (json.loads((run / name).read_text()) for name in ("report.json", "report_shots3.json"))
    assert one["shots"] == 1 and three["shots"] == 3
    assert one["structures"] == ["liver", "spine"] and "baseline_atlas" in one
    assert 0.0 <= one["metrics"]["dice"]["mean"] <= 1.0
    assert (run / "report.html").is_file() and (run / "report_shots3.html").is_file()
