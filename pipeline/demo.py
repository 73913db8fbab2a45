"""`python -m pipeline demo`: the three task kinds end to end on embedded synthetic data."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_classification(out: Path, overrides: list[str]) -> str:
    """Meta-train ProtoNet on the synthetic cohort's common lesion types, evaluate on the three rare ones."""
    from datasets.synth import write_cohort
    from pipeline.classification.evaluate import evaluate, summary_table
    from pipeline.classification.train import train
    from pipeline.common.config import load_config

    data = out / "data"
    if not (data / "findings.csv").is_file():
        print(write_cohort(data, seed=0))
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.root={data}", *overrides])
    run_dir = train(cfg, out / "run")
    report = evaluate(run_dir)
    return f"{summary_table(report)}\nreport: {run_dir / 'report.json'}"


def run_demo(out: Path, task: str = "all", overrides: list[str] | None = None) -> str:
    """Run one journey (or all); returns the summary the CLI prints."""
    start = time.perf_counter()
    text = demo_classification(out, overrides or [])
    return f"{text}\n({time.perf_counter() - start:.0f} s)"
