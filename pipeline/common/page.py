"""The report page: one self-contained HTML file per evaluation report (`report.json` -> `report.html`,
`report_shots1.json` -> `report_shots1.html`), to read in a browser or send to a colleague.

The file holds everything: inline CSS, the PNGs as base64 data URIs, no script, nothing fetched from the network.
It never shows a patient: the split appears as counts, data paths as their last folder name. `evaluate` writes
the page after the report (`write_page`); `python -m pipeline report` rebuilds it (`report_arguments`,
`report_verb`). Importing this module is cheap (the CLI imports it up front): plotting and statistics load on use.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from datasets.volume import FewscanError, atomic_path
from pipeline.common.page_tasks import (
    MAIN_METRIC,
    METRIC_NAME,
    REFERENCE,
    ci,
    comparisons,
    detail_tables,
    figures,
    headline_columns,
    models,
    number,
    split_rows,
    verdict,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Config sections that matter to each task kind; the full config.yaml is on the page too, folded.
SECTIONS = {"classification": ("data", "split", "transforms", "episodes", "model", "method", "train"),
            "segmentation": ("data", "transforms", "episodes", "train", "segmentation"),
            "registration": ("data", "transforms", "train", "registration")}
PATH_KEYS = {"root", "manifest", "labels", "npz_parts", "extra_roots"}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2430;max-width:1100px;
margin:24px auto;padding:0 18px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d6dbe3;padding-bottom:3px}
h3{font-size:14px;margin:16px 0 6px}table{border-collapse:collapse;margin:6px 0 12px}
th,td{border:1px solid #d6dbe3;padding:4px 9px;text-align:left;vertical-align:top}th{background:#f1f4f8}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.trained td{font-weight:600;background:#f6fbf6}tr.worse td{background:#fdecec}tr.unclear td{background:#fff8e1}
tr.better td{background:#eef8ee}.flag{border:2px solid #c62828;background:#fdecec;padding:8px 12px;margin:12px 0}
.ok{border:1px solid #2e7d32;background:#eef8ee;padding:8px 12px;margin:12px 0}.muted{color:#5b6678}
figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #d6dbe3}figcaption{color:#5b6678;font-size:13px}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:12px}.grid{display:flex;flex-wrap:wrap;gap:0 22px}
@media print{body{margin:0}h2{break-after:avoid}figure{break-inside:avoid}}
"""


# --- entry points ------------------------------------------------------------------------------------------------
def page_path(report_path: Path) -> Path:
    """The page of a report JSON: same folder and stem, `.html`."""
    return Path(report_path).with_suffix(".html")


def write_page(run_dir: Path, report_path: Path, out: Path | None = None, suffix: str | None = None) -> Path:
    """Write the page of `report_path` (a run's report JSON) atomically; returns its path.

    Args:
        out: the page to write (default `page_path(report_path)`).
        suffix: the suffix of the plots `evaluate` wrote beside the report (`_shots1`); default from the report's
            name (`report_shots1.json` -> `_shots1`, any other name -> none).

    Raises:
        FewscanError: the report or the run's config cannot be read, the report is not one of a known task kind
            or is malformed, `out` is the report itself, or `out` cannot be written.
    """
    run_dir, report_path = Path(run_dir), Path(report_path)
    out = Path(out) if out is not None else page_path(report_path)
    if out.resolve() == report_path.resolve():
        raise FewscanError(f"{out}: that is the report itself; write the page to an .html file")
    report = _read_json(report_path)
    if not isinstance(report, dict) or report.get("task") not in MAIN_METRIC:
        raise FewscanError(f"{report_path}: not a fewscan evaluation report (task: one of {sorted(MAIN_METRIC)})")
    if suffix is None:
        stem = report_path.stem
        suffix = stem.removeprefix("report") if stem.startswith("report_") else ""
    try:
        text = render(run_dir, report, report_path, suffix)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a hand-edited or truncated report
        raise FewscanError(f"{report_path}: malformed {report['task']} report ({type(err).__name__}: {err}); "
                           "run `evaluate` again") from None
    try:
        with atomic_path(out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        raise FewscanError(f"{out}: cannot write the page ({err.strerror or err})") from None
    return out


def rebuild_page(run_dir: Path, report: Path | None = None, out: Path | None = None) -> Path:
    """The `report` verb: (re)write the page of a run's report (default `RUN_DIR/report.json`).

    Raises:
        FewscanError: `run_dir` is not a run directory, or the report does not exist yet.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FewscanError(f"{run_dir}: not a run directory (no config.yaml); run `train` first")
    report = Path(report) if report is not None else run_dir / "report.json"
    if not report.is_file():
        raise FewscanError(f"{report}: no report yet; run `evaluate` first")
    return write_page(run_dir, report, out)


def report_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `python -m pipeline report RUN_DIR [--report REPORT_JSON] [--out FILE.html]`."""
    p.add_argument("run_dir", type=Path, help="run directory that `evaluate` wrote a report into")
    p.add_argument("--report", type=Path, default=None, help="report JSON (default RUN_DIR/report.json)")
    p.add_argument("--out", type=Path, default=None, help="page to write (default: the report's path, .html)")


def report_verb(args: argparse.Namespace) -> int:
    """`python -m pipeline report`: rebuild the page of a run's report and print its path."""
    print(f"page: {rebuild_page(args.run_dir, args.report, args.out)}")
    return 0


def _read_json(path: Path) -> Any:
    """A JSON file the page needs (the report); a clear error when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FewscanError(f"{path}: cannot read this JSON file ({err})") from None


def _read_optional(path: Path) -> Any:
    """A JSON file of the run, or None when it is absent or unreadable (the page then leaves that part out)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the page ----------------------------------------------------------------------------------------------------
def render(run_dir: Path, report: dict[str, Any], report_path: Path, suffix: str) -> str:
    """The whole HTML page of `report` (read from `report_path`) of the run in `run_dir`."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FewscanError(f"{run_dir / 'config.yaml'}: cannot read the run's config ({err})") from None
    task = str(report["task"])
    if config.get("task", "classification") != task:
        raise FewscanError(f"{report_path}: a {task} report, but {run_dir} is a {config.get('task')} run")
    title = f"fewscan {task} report: {report.get('method', '?')} on {_data_name(config)}"
    parts = [_header(task, report, config, run_dir, report_path, title), _flag(report), _how_to_read(task),
             _results(task, report), _figures(run_dir, report, report_path.parent, suffix),
             _run_details(task, report, config, run_dir)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


def esc(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def table(header: list[str] | None, rows: list[list[str]], row_attrs: list[str] | None = None,
          numeric: Collection[int] | None = None) -> str:
    """An HTML table of text cells (escaped).

    Args:
        header: None for a key/value table without a header row.
        row_attrs: per row, raw attributes for its `<tr>` (built only from escaped values).
        numeric: the columns to right-align as numbers (default: all but the first).
    """
    def cell(tag: str, i: int, text: str) -> str:
        right = i > 0 if numeric is None else i in numeric
        return f"<{tag}{' class=num' if right else ''}>{esc(text)}</{tag}>"

    head = f"<thead><tr>{''.join(cell('th', i, h) for i, h in enumerate(header))}</tr></thead>" if header else ""
    body = "".join(f"<tr{' ' + row_attrs[n] if row_attrs and row_attrs[n] else ''}>"
                   f"{''.join(cell('td', i, c) for i, c in enumerate(row))}</tr>" for n, row in enumerate(rows))
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _when(path: Path) -> str:
    """The local date and time `path` was last written."""
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except OSError:
        return "unknown"


def _data_name(config: dict[str, Any]) -> str:
    """The data root's last folder name (never the full path)."""
    root = (config.get("data") or {}).get("root")
    return Path(str(root)).name if root else "unknown data"


def _header(task: str, report: dict[str, Any], config: dict[str, Any], run_dir: Path, report_path: Path,
            title: str) -> str:
    """The title and the run at a glance: task kind, method, data, episodes, dates."""
    rows = [["task kind", task], ["method", str(report.get("method", "?"))]]
    for key, label in (("encoder", "encoder"), ("mode", "mode"), ("supervision", "supervision")):
        if key in report:
            rows.append([label, str(report[key])])
    extra = [Path(str(r)).name for r in (config.get("registration") or {}).get("extra_roots") or []]
    how = f"{(config.get('data') or {}).get('source')} source" if task == "classification" else "Decathlon folder"
    rows.append(["data", f"{', '.join([_data_name(config), *extra])} ({how})"])
    if task == "registration":
        rows += [["held-out pairs scored", str(report.get("pairs", "?"))],
                 ["adaptation pairs", str(report.get("adapt_pairs", "?"))],
                 ["data tasks", ", ".join(map(str, report.get("tasks", [])))]]
    else:
        shots = f"{report.get('shots', '?')} support, {report.get('queries', '?')} query"
        if task == "classification":
            rows.append(["episodes", f"{report.get('ways', '?')}-way, {shots} per class "
                                     f"(chance {number(report.get('chance'), 3)})"])
        else:
            rows.append(["episodes", f"{shots} scan(s) per structure; structures "
                                     f"{', '.join(map(str, report.get('structures', [])))}"])
        rows.append(["evaluation episodes", str(report.get("episodes", "?"))])
    rows += [["evaluated", f"{_when(report_path)} ({report_path.name})"], ["trained", _when(run_dir / "state.json")]]
    return f"<h1>{esc(title)}</h1>\n" + table(None, rows, numeric=())


def _flag(report: dict[str, Any]) -> str:
    """A warning when the trained model is not better than its reference (paired CI includes or is below 0)."""
    task = str(report["task"])
    found = [c for c in comparisons(report) if c[0] == REFERENCE.get(task)]
    if not found:
        return ""
    _, name, diff, _ = found[0]
    text = (f"paired {METRIC_NAME[MAIN_METRIC[task]]} difference, trained minus {name}: {ci(diff, signed=True)} "
            f"over {diff.get('n', '?')} {'pairs' if task == 'registration' else 'episodes'}")
    if diff["ci95"][0] > 0:
        return f'<p class="ok">The trained model is better than {esc(name)}: {esc(text)}.</p>'
    return (f'<p class="flag" id="not-better"><strong>Not better than {esc(name)}.</strong> The trained model does '
            f"not beat {esc(name)} on these {'pairs' if task == 'registration' else 'episodes'}: {esc(text)}, "
            "a 95% interval that includes or lies below 0.</p>")


def _how_to_read(task: str) -> str:
    """A short paragraph on reading means, 95% CIs and paired differences."""
    unit, more = (("pair", "registration.eval_pairs") if task == "registration" else
                  ("episode", "episodes.eval_episodes"))
    return ("<h2>How to read this page</h2>\n<p>Every model was scored on the same fixed set of held-out "
            f"{unit}s. A number is the mean over them with its 95% confidence interval, e.g. <code>0.587 [0.552, "
            "0.621]</code>. A <em>paired difference</em> subtracts another model's score from the trained model's, "
            f"{unit} by {unit}: when its interval lies above 0 the trained model is better on these cases, when it "
            "includes 0 the data cannot tell the two apart, and below 0 it is worse. Two unpaired intervals that "
            "overlap say little; the paired differences are the comparison to trust. Few "
            f"{unit}s give wide intervals: evaluate more (<code>{more}</code>) before drawing conclusions. "
            "Higher is better, except for HD95 (mm), folding and the SD of the log-Jacobian. The figures and "
            "tables below come from the same report file; the configuration and split at the end say how the "
            "model was trained.</p>")


def _results(task: str, report: dict[str, Any]) -> str:
    """Headline table, paired differences and the per-class or per-structure tables."""
    columns = headline_columns(task)
    rows, attrs = [], []
    for key, name, block in models(report):
        rows.append([name, *(get(block) for _, get in columns)])
        attrs.append(f'data-row="{esc(key)}"' + (' class="trained"' if key == "trained" else ""))
    out = ["<h2>Headline results</h2>", f"<p class=muted>Mean [95% CI] over {esc(report.get('episodes', '?'))} "
           f"{'pairs' if task == 'registration' else 'episodes'}.</p>",
           f'<div id="headline">{table(["model", *(c for c, _ in columns)], rows, attrs)}</div>']
    diffs = comparisons(report)
    if diffs:
        metric = MAIN_METRIC.get(task, "dice")
        rows = [[f"trained minus {name}" + (" (computed here from per-pair Dice)" if computed else ""),
                 ci(diff, signed=True), verdict(diff)] for _, name, diff, computed in diffs]
        attrs = [f'data-row="{esc(key)}" class="{_shade(diff)}"' for key, _, diff, _ in diffs]
        out += [f"<h3>Paired differences of {esc(METRIC_NAME[metric])} (trained model minus each other model)</h3>",
                f'<div id="paired">{table(["comparison", "difference [95% CI]", "verdict"], rows, attrs, (1,))}</div>']
    if "empty_mask_policy" in report:
        out.append(f"<p class=muted>Scoring: {esc(report['empty_mask_policy'])}.</p>")
    for title, header, rows in detail_tables(report):
        out += [f"<h3>{esc(title)}</h3>", table(header, rows)]
    return "\n".join(out)


def _shade(diff: dict[str, Any]) -> str:
    """The row class of a paired difference: where its 95% CI lies relative to 0."""
    low, high = diff["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "unclear"


def _figures(run_dir: Path, report: dict[str, Any], folder: Path, suffix: str) -> str:
    """The learning curve and every plot `evaluate` wrote for this report, embedded."""
    shown = [(run_dir / "learning_curve.png", "Learning curve: meta-training loss (and, for classification, the "
              "accuracy on training episodes) at each logged iteration.")]
    shown += figures(report, folder, suffix)
    out = ["<h2>Figures</h2>"]
    for path, caption in shown:
        image = embed_png(path)
        if image:
            out.append(f"<figure>{image}<figcaption>{esc(caption)}</figcaption></figure>")
    if len(out) == 1:
        out.append("<p class=muted>No figures were found for this report.</p>")
    return "\n".join(out)


def embed_png(path: Path) -> str:
    """An `<img>` holding the PNG at `path` as a data URI; empty when the file is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if not data.startswith(PNG_SIGNATURE):
        return ""
    return f'<img alt="{esc(path.stem)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _run_details(task: str, report: dict[str, Any], config: dict[str, Any], run_dir: Path) -> str:
    """Time taken, the split (counts) and the configuration (paths shortened)."""
    out = ["<h2>Time taken</h2>", table(None, _time_rows(report, run_dir), numeric=())]
    split = _read_optional(run_dir / "split.json")
    if isinstance(split, dict):
        out += ["<h2>Split</h2>", "<p class=muted>Patients are counted, never listed.</p>",
                table(["part", "count", "names"], split_rows(task, split), numeric=(1,))]
    shown = _redact(config)
    out.append("<h2>Configuration</h2>\n<div class=grid>")
    for section in SECTIONS.get(task, ()):
        if isinstance(shown.get(section), dict):
            rows = [[k, _value(v)] for k, v in _flatten(shown[section])]
            out.append(f"<div><h3>{esc(section)}</h3>{table(['key', 'value'], rows, numeric=())}</div>")
    out.append(f"</div>\n<p>task <code>{esc(shown.get('task'))}</code>, seed <code>{esc(shown.get('seed'))}</code>"
               "</p>\n<details><summary>The whole resolved config.yaml (data paths shortened to their folder name)"
               f"</summary><pre>{esc(yaml.safe_dump(shown, sort_keys=False))}</pre></details>")
    return "\n".join(out)


def _time_rows(report: dict[str, Any], run_dir: Path) -> list[list[str]]:
    """Training time (state.json), evaluation and adaptation time, and seconds per query or pair."""
    rows = []
    state = _read_optional(run_dir / "state.json")
    if isinstance(state, dict):
        if "seconds" in state:
            how = f"{state.get('iterations', '?')} iterations on {state.get('device', '?')}"
            if state.get("stopped_early"):
                how += ", stopped early"
            rows.append(["training", f"{_duration(state['seconds'])} ({how})"])
        if "prepare_seconds" in state:
            rows.append(["data preparation before training", _duration(state["prepare_seconds"])])
    if "evaluation_seconds" in report:
        rows.append(["evaluation (all models)", _duration(report["evaluation_seconds"])])
    if "adapt_seconds" in report:
        rows.append(["adaptation on the adaptation pairs", _duration(report["adapt_seconds"])])
    for _, name, block in models(report):
        if "seconds_per_query" in block:
            rows.append([f"{name}: per query", f"{number(block['seconds_per_query'], 3)} s"])
        elif "seconds" in block.get("metrics", {}):
            rows.append([f"{name}: per pair", f"{number(block['metrics']['seconds']['mean'], 3)} s"])
    return rows or [["time", "not recorded"]]


def _duration(seconds: Any) -> str:
    """Seconds as `12.3 s`, or minutes from two minutes on."""
    text = number(seconds, 1)
    if text == "n/a" or float(seconds) < 120:
        return f"{text} s"
    return f"{float(seconds) / 60:.1f} min"


def _redact(value: Any, key: str = "") -> Any:
    """The config with data paths cut to their last folder name (local paths tell a reader nothing, and a
    folder may be named after a patient, so only the data root's name is kept)."""
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str) and (key in PATH_KEYS or os.path.isabs(value)):
        return Path(value).name
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config mappings as `(dotted.key, value)` pairs."""
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _value(v: Any) -> str:
    """A config value as text: lists, mappings, booleans and null as in JSON."""
    return json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)
