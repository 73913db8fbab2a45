"""`python -m pipeline VERB ...`: the fewscan command line.

Each verb is a pair (add_arguments, run) in the VERBS registry below; the work itself lives in `datasets/`,
`transforms/` and `pipeline/` modules, imported lazily so `--help` stays fast.
User errors (`FewscanError`) print one line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from datasets.volume import FewscanError

REPO = Path(__file__).resolve().parents[1]

Verb = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


# --- synth ---------------------------------------------------------------------------------------------
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="folder to write the synthetic TCIA-style cohort into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", type=int, default=None, help="number of patients (default: the demo size)")


def _synth(args: argparse.Namespace) -> int:
    from datasets.synth import write_cohort

    summary = write_cohort(args.out_dir, seed=args.seed, n_patients=args.patients)
    print(summary)
    return 0


# --- index ---------------------------------------------------------------------------------------------
def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="folder tree to index (TCIA-style DICOM, NIfTI, Decathlon)")
    p.add_argument("--labels", type=Path, default=None, help="findings CSV to join onto the series rows")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")


def _index(args: argparse.Namespace) -> int:
    from datasets.index import index_tree, write_manifest

    rows = index_tree(args.root, labels=args.labels)
    write_manifest(rows, args.out)
    print(f"indexed {len(rows)} rows -> {args.out}")
    return 0


# Each task kind is a module with `train(cfg, run_dir) -> Path`, `evaluate(run_dir, out) -> dict` and
# `summary_table(report) -> str`.
TASKS: dict[str, str] = {
    "classification": "pipeline.classify",
}


def task_module(task: str):  # noqa: ANN201 - a module object
    import importlib

    if task not in TASKS:
        raise FewscanError(f"unknown task {task!r} (known: {sorted(TASKS)})")
    return importlib.import_module(TASKS[task])


# --- train -------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=50 (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = task_module(cfg.task).train(cfg, args.out)
    print(f"run directory: {run_dir}")
    return 0


# --- evaluate ----------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory written by `train`")
    p.add_argument("--out", type=Path, default=None, help="report path (default RUN_DIR/report.json)")


def _evaluate(args: argparse.Namespace) -> int:
    import yaml

    if not (args.run_dir / "config.yaml").is_file():
        raise FewscanError(f"{args.run_dir}: not a run directory (no config.yaml); run `train` first")
    task = (yaml.safe_load((args.run_dir / "config.yaml").read_text()) or {}).get("task", "classification")
    module = task_module(task)
    report = module.evaluate(args.run_dir, args.out)
    print(module.summary_table(report))
    print(f"report: {args.out or args.run_dir / 'report.json'}")
    return 0


# --- demo --------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the cohort and the run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of configs/demo.yaml")


def _demo(args: argparse.Namespace) -> int:
    from datasets.synth import write_cohort
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate, summary_table
    from pipeline.train import train

    start = time.perf_counter()
    data = args.out / "data"
    if not (data / "findings.csv").is_file():
        print(write_cohort(data, seed=0))
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.root={data}", *args.overrides])
    run_dir = train(cfg, args.out / "run")
    report = evaluate(run_dir)
    print(summary_table(report))
    print(f"report: {run_dir / 'report.json'}  ({time.perf_counter() - start:.0f} s)")
    return 0


VERBS: dict[str, Verb] = {
    "synth": (_synth_args, _synth),
    "index": (_index_args, _index),
    "train": (_train_args, _train),
    "evaluate": (_evaluate_args, _evaluate),
    "demo": (_demo_args, _demo),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (add_args, _) in VERBS.items():
        add_args(sub.add_parser(name, help=(VERB_HELP.get(name) or name)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return VERBS[args.verb][1](args)
    except FewscanError as err:
        print(f"fewscan {args.verb}: error: {err}", file=sys.stderr)
        return 2


VERB_HELP: dict[str, str] = {
    "synth": "write the seeded synthetic TCIA-style demo cohort (DICOM + NIfTI + findings.csv)",
    "index": "index a folder tree into a manifest CSV",
    "train": "meta-train from a YAML config into a run directory",
    "evaluate": "evaluate a run on its held-out classes over fixed episodes; writes report.json",
    "demo": "synth + train + evaluate on the embedded synthetic cohort, then print a summary",
}

if __name__ == "__main__":
    sys.exit(main())
