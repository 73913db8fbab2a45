"""What the report page (`pipeline.common.page`) shows of each task kind's report: the compared models, their
headline metrics, the paired differences, the per-class or per-structure tables, the split and the figures.

Everything here returns plain text cells; `pipeline.common.page` escapes and lays them out. SciPy and matplotlib
(under `metrics` and `report`) are imported where used, so the CLI can import the page modules for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Block = dict[str, Any]
Column = tuple[str, Callable[[Block], str]]

# The main metric of each task kind: the one the paired differences and the "not better" flag are about.
MAIN_METRIC = {"classification": "accuracy", "segmentation": "dice", "registration": "dice"}
METRIC_NAME = {"accuracy": "accuracy", "dice": "Dice"}
# The reference a trained model must beat: the untrained weights (registration: no registration at all, since the
# untrained network is not scored there).
REFERENCE = {"classification": "untrained", "segmentation": "untrained", "registration": "unregistered"}


def ci(m: dict[str, Any] | None, digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    """`mean [low, high]` (`ci_text`), or `n/a` for a missing or non-finite mean (a metric nothing scored)."""
    from pipeline.common.report import ci_text

    if not m or not all(math.isfinite(float(v)) for v in [m["mean"], *m["ci95"]]):
        return "n/a"
    return ci_text(m, digits=digits, scale=scale, signed=signed)


def number(value: Any, digits: int = 2) -> str:
    """A float to `digits` decimals, `n/a` when missing or not finite."""
    try:
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else "n/a"
    except (TypeError, ValueError):
        return "n/a"


def _metric(name: str, digits: int = 3, scale: float = 1.0) -> Callable[[Block], str]:
    return lambda b: ci(b.get("metrics", {}).get(name), digits, scale)


def models(report: dict[str, Any]) -> list[tuple[str, str, Block]]:
    """The compared models as `(key, display name, block)`: the reference (and registration's meta-init), the
    trained model (key `trained`: the report's top level), then the baselines."""
    task, method = report.get("task"), report.get("method", "?")
    out: list[tuple[str, str, Block]] = []
    if task == "registration":
        out.append(("unregistered", "unregistered (no registration)", report.get("unregistered")))
        if "meta_init" in report:
            out.append(("meta_init", f"fewscan {method} meta-init (before adaptation)", report["meta_init"]))
        out.append(("trained", f"fewscan {method}" + (" adapted" if "meta_init" in report else ""), report))
        names = {"baseline_affine": "SimpleITK affine (baseline)"}
    else:
        out.append(("untrained", "untrained (initial weights)", report.get("untrained")))
        out.append(("trained", f"trained ({method})", report))
        names = {"baseline_finetune": "finetune baseline (trained encoder, new head per support set)",
                 "baseline_atlas": "atlas baseline (support registered onto the query)"}
    for key, block in report.items():
        if key.startswith("baseline_") and isinstance(block, dict):
            kind = f"SimpleITK {block['kind']} (baseline)" if "kind" in block else key.removeprefix("baseline_")
            out.append((key, names.get(key, kind), block))
    return [(k, n, b) for k, n, b in out if isinstance(b, dict)]


def headline_columns(task: str) -> list[Column]:
    """The headline table's metric columns of a task kind (95% CIs over episodes or pairs)."""
    if task == "classification":
        return [("accuracy", _metric("accuracy")), ("balanced accuracy", _metric("balanced_accuracy")),
                ("macro-AUC", _metric("auc"))]
    if task == "segmentation":
        return [("Dice", _metric("dice")), ("HD95 mm", _metric("hd95", 2)),
                ("s / query", lambda b: number(b.get("seconds_per_query")))]
    return [("Dice", _metric("dice")), ("HD95 mm", _metric("hd95", 2)), ("folding %", _metric("folding", 3, 100.0)),
            ("SD log-Jacobian", _metric("log_jac_std")), ("s / pair", _metric("seconds", 2))]


def comparisons(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """The trained model minus each other model, episode by episode: `(key, display name, mean_ci95, computed)`.

    The report's own `paired` entries come first; registration reports pair only the SimpleITK baselines, so the
    differences to the unregistered pairs and the meta-init are computed here from the per-pair Dice
    (`computed` True).
    """
    from pipeline.common.metrics import paired_differences

    task = report.get("task", "")
    metric = MAIN_METRIC.get(task, "dice")
    names = {key: name for key, name, _ in models(report)}
    out = [(key, names.get(key, key), diff[metric], False)
           for key, diff in report.get("paired", {}).items() if isinstance(diff, dict) and metric in diff]
    ours = report.get("per_pair", {}).get("dice")
    computed = []
    for key in ("unregistered", "meta_init") if task == "registration" and ours else ():
        theirs = report.get(key, {}).get("per_pair", {}).get("dice")
        if theirs and len(theirs) == len(ours) and key not in report.get("paired", {}):
            computed.append((key, names[key], paired_differences(ours, {key: theirs})[key]["dice"], True))
    return computed + out


def verdict(diff: dict[str, Any]) -> str:
    """`better`, `worse` or `no clear difference`, from where the 95% CI of a difference lies relative to 0."""
    low, high = diff["ci95"]
    if low > 0:
        return "better (CI above 0)"
    if high < 0:
        return "worse (CI below 0)"
    return "no clear difference (CI includes 0)"


def detail_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per-class recall (classification) or per-structure Dice and HD95 of every model: `(title, header, rows)`."""
    if report.get("task") == "classification":
        rows = [[name, ci(v.get("recall")), str(v.get("recall", {}).get("n", ""))]
                for name, v in report.get("per_class", {}).items()]
        return [("Per class: recall of the trained model (share of a class's queries classified correctly), over "
                 "the episodes that include the class", ["class", "recall [95% CI]", "episodes"], rows)]
    blocks = [(name, b) for _, name, b in models(report) if b.get("per_structure")]
    structures = sorted({s for _, b in blocks for s in b["per_structure"]})
    tables = []
    for metric, label, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 2)):
        rows = [[s, *(ci(b["per_structure"].get(s, {}).get(metric), digits) for _, b in blocks)] for s in structures]
        if rows:
            tables.append((f"Per structure: {label}, mean [95% CI]", ["structure", *(n for n, _ in blocks)], rows))
    return tables


def split_rows(task: str, split: dict[str, Any]) -> list[list[str]]:
    """The split as `[part, count, names]` rows: class and structure names, but patients only counted."""
    rows: list[list[str]] = []
    if task == "registration":  # {data task: {group: [patient keys]}}
        for name, groups in split.items():
            for group, keys in (groups.items() if isinstance(groups, dict) else []):
                rows.append([f"{name}: {group} patients", str(len(keys)), ""])
        return rows
    labels = ({"base": "base classes (meta-training)", "validation": "validation classes",
               "novel": "novel classes (evaluated)"} if task == "classification" else
              {"train": "training structures", "test": "held-out structures (evaluated)"})
    for key, label in labels.items():
        names = split.get(key, [])
        if isinstance(names, list):
            rows.append([label, str(len(names)), ", ".join(map(str, names)) or "(none)"])
    for group, keys in (split.get("patients") or {}).items():  # patient keys: counted, never listed
        rows.append([f"{group} patients", str(len(keys)) if isinstance(keys, list) else "?", ""])
    for key in ("train_cases", "test_cases"):
        if key in split:
            rows.append([key.replace("_", " ").replace("test", "held-out"), str(split[key]), ""])
    return rows


def figures(report: dict[str, Any], folder: Path, suffix: str) -> list[tuple[Path, str]]:
    """The PNGs `evaluate` wrote beside this report (`suffix`: `_shots1` for `report_shots1.json`), with captions."""
    task = report.get("task")
    if task == "classification":
        return [(folder / f"accuracy{suffix}.png", "Accuracy per evaluation episode for each model (box: quartiles, "
                 "triangle: mean, dashed line: chance)."),
                (folder / f"confusion{suffix}.png", "Confusion matrix of the trained model over all episodes (rows: "
                 "true class, shade: share of the row, numbers: query counts).")]
    if task == "segmentation":
        out = [(folder / f"dice{suffix}.png", "Dice per episode for each held-out structure and model.")]
        out += [(folder / f"overlay_{s}{suffix}.png", f"{s}: the support slice with its mask, the query, the "
                 "trained model's prediction (red) and the ground truth (green).")
                for s in report.get("structures", [])]
        return out
    return []  # registration's evaluate writes no plots
