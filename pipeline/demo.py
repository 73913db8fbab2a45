"""`python -m pipeline demo`: the three task kinds, and adaptation, end to end on embedded synthetic data.

Each journey writes its own seeded synthetic data under OUT, trains with a ready config (`configs/demo*.yaml`),
evaluates on held-out classes / structures / subjects against the untrained network and the classical baseline,
and returns the summary the CLI prints. Synthetic data shows that the journeys work, not how well the methods do
on real scans: those figures are in `benchmarks/README.md`.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

from datasets.volume import FewscanError

REPO = Path(__file__).resolve().parents[1]
JOURNEYS = ("classification", "segmentation", "registration")


def _report_lines(run_dir: Path) -> str:
    """Where the run's results went (the HTML page when evaluate wrote one)."""
    page = run_dir / "report.html"
    return f"report: {page if page.is_file() else run_dir / 'report.json'}"


def demo_classification(out: Path, overrides: list[str]) -> tuple[str, Path]:
    """Meta-train ProtoNet on the synthetic cohort's five common lesion types; evaluate 3-way 5-shot on the three
    rare ones, which training never sees. Returns the summary and the run folder."""
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
    return f"{summary_table(report)}\n{_report_lines(run_dir)}", run_dir


def _rare_lesions(run_dir: Path) -> dict[str, list[dict[str, str]]]:
    """The run's manifest rows of each held-out (novel) lesion type, one row per patient, in manifest order, each
    with its series folder found again under the run's `data.root`."""
    import json

    from datasets.index import locate, read_manifest
    from pipeline.common.run import load_run_config

    novel = json.loads((run_dir / "split.json").read_text())["novel"]
    by_type: dict[str, list[dict[str, str]]] = {t: [] for t in novel}
    seen: set[tuple[str, str]] = set()
    manifest = run_dir / "manifest.csv"
    for row in locate(read_manifest(manifest), manifest, Path(load_run_config(run_dir).data.root)):
        kind = row.get("lesion_type", "")
        if kind in by_type and (kind, row["patient_key"]) not in seen:
            seen.add((kind, row["patient_key"]))
            by_type[kind].append(row)
    return by_type


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def demo_adapt(run_dir: Path, out: Path, shots: int = 5, queries: int = 10) -> str:
    """Journey 2: adapt the trained classifier to the three rare lesion types from `shots` scans each (a support
    CSV of series folders, labels and lesion centres), then predict on `queries` new patients' scans per type.

    The support and query CSVs are left in `out` as examples of the format.
    """
    from pipeline.classification.task import adapt, predict

    out.mkdir(parents=True, exist_ok=True)
    support, query, truth = [], [], []
    for kind, rows in _rare_lesions(run_dir).items():
        if len(rows) < shots + queries:
            raise FewscanError(f"{run_dir}: only {len(rows)} patients with a {kind}; the demo needs "
                               f"{shots + queries}")
        for i, row in enumerate(rows[:shots + queries]):
            entry = {"path": os.path.relpath(row["path"], out), "label": kind,
                     **{c: row[c] for c in ("lps_x", "lps_y", "lps_z")}}
            if i < shots:
                support.append(entry)
            else:
                query.append({k: v for k, v in entry.items() if k != "label"})
                truth.append(kind)
    _write_csv(out / "support.csv", support)
    _write_csv(out / "queries.csv", query)
    adapt(run_dir, out / "support.csv", out / "adapted")
    predict(out / "adapted", [], out / "predictions", queries=out / "queries.csv")
    with (out / "predictions" / "predictions.csv").open(newline="") as f:
        predicted = [row["prediction"] for row in csv.DictReader(f)]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return (f"adapted to {len(set(truth))} new lesion types from {shots} scans each ({out / 'support.csv'}); "
            f"{correct}/{len(truth)} lesions of {queries} new patients per type classified correctly "
            f"(chance {1 / len(set(truth)):.2f}) -> {out / 'predictions' / 'predictions.csv'}")


def demo_decathlon(out: Path, task: str) -> str:
    """Journeys 3 and 4 on a synthetic Decathlon folder, each with its demo config (`configs/demo_*.yaml`).

    segmentation: 1-shot label propagation of each synthetic organ onto held-out subjects (training reads no label),
    against SimpleITK atlas registration on the same episodes; registration: inter-subject deformable registration
    of held-out synthetic subjects, against SimpleITK affine + demons.
    """
    import importlib

    from datasets.synth_decathlon import write_synthetic_organs, write_synthetic_subjects
    from pipeline.common.config import load_config

    folder, write, config = {"segmentation": ("organs", write_synthetic_organs, "demo_segment.yaml"),
                             "registration": ("subjects", write_synthetic_subjects, "demo_register.yaml")}[task]
    module = importlib.import_module(f"pipeline.{task}.task")
    data = out / folder
    if not (data / "dataset.json").is_file():
        write(data, n_cases=16, seed=0)
    run_dir = module.train(load_config(REPO / "configs" / config, [f"data.root={data}"]), out / "run")
    return f"{module.summary_table(module.evaluate(run_dir, None))}\n{_report_lines(run_dir)}"


def run_demo(out: Path, task: str = "all", overrides: list[str] | None = None) -> str:
    """Run one journey, or all of them (classification, adapt + predict, segmentation, registration).

    Args:
        out: folder for every journey's synthetic data and run (`OUT/classification/run`, ...).
        task: `all` or one of `JOURNEYS`.
        overrides: `--set` items for the classification config (`configs/demo.yaml`).

    Returns:
        The summary the CLI prints: each journey's table, where its report went and how long it took.
    """
    parts: list[str] = []
    total = time.perf_counter()
    for journey in JOURNEYS if task == "all" else (task,):
        start = time.perf_counter()
        print(f"== demo: {journey} ==", flush=True)
        if journey == "classification":
            text, run_dir = demo_classification(out / journey, overrides or [])
            text += "\n\n== adapt + predict ==\n" + demo_adapt(run_dir, out / journey / "adapt")
        else:
            text = demo_decathlon(out / journey, journey)
        parts.append(f"== {journey} ({time.perf_counter() - start:.0f} s) ==\n{text}")
    return "\n\n".join(parts) + f"\n\ndemo finished in {time.perf_counter() - total:.0f} s; everything is under {out}"
