"""No raw patient identifier in anything synth -> index -> train -> evaluate -> report writes or prints (issue #19).

The one documented exception is the data-side locator `index` writes beside its manifest (`m.paths.csv`, and the
header cache `m.csv.cache.json`): it must point at the collection's own folders, which TCIA names by patient ID.
Every other file, column and log line is checked, the manifests included.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]
RAW = re.compile(r"SYN\d{4}")  # the synthetic cohort's PatientIDs (PatientName is ANON^<id>)


@pytest.mark.slow
def test_no_patient_id_in_outputs_or_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    cohort, run = tmp_path / "cohort", tmp_path / "run"
    assert main(["synth", str(cohort), "--patients", "16", "--seed", "3"]) == 0
    capsys.readouterr()  # synth itself lists its patients: the data, not an output of the pipeline
    assert main(["index", str(cohort), "--labels", str(cohort / "findings.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={cohort}", "train.iterations=2",
                 "episodes.eval_episodes=3", "--out", str(run)]) == 0
    assert main(["evaluate", str(run)]) == 0
    printed = capsys.readouterr()
    assert not RAW.search(printed.out + printed.err + caplog.text)

    locator = list(csv.DictReader((tmp_path / "m.paths.csv").open()))
    assert locator and all(RAW.search(r["path"]) for r in locator)  # the exception is real: folders are IDs
    checked = 0
    for path in [tmp_path / "m.csv", *sorted(run.rglob("*"))]:
        if not path.is_file() or path.suffix not in {".csv", ".json", ".yaml", ".html", ".txt"}:
            continue
        text = path.read_text()
        assert not RAW.search(text), f"{path.name}: {RAW.search(text).group()}"
        checked += 1
    assert checked >= 9  # manifests, config, split, curves, state, episodes, report.json, report.html, ...
