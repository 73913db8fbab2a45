"""`python -m pipeline VERB ...`: the fewscan command line.

Each verb is a pair (add_arguments, run) in the VERBS registry below; the work itself lives in `datasets/`,
`transforms/` and `pipeline/` modules, imported lazily so `--help` stays fast.
User errors (`FewscanError`) print one line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from datasets.volume import FewscanError
from pipeline.common.outputs import check_outputs
from pipeline.common.page import page_path, report_arguments, report_verb  # light: plots load on use
from pipeline.export import export_arguments, export_verb  # light: torch loads on use

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
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (default: in-process)")
    p.add_argument("--salt", default=None, help="patient-key salt (default: env FEWSCAN_SALT, else a public one)")
    p.add_argument("--raw-ids", action="store_true",
                   help="keep raw patient-ID columns of the findings CSV, and file paths in the manifest itself")
    p.add_argument("--no-cache", action="store_true",
                   help="re-read every file (default: reuse OUT.cache.json for unchanged files)")


def _index(args: argparse.Namespace) -> int:
    from datasets.index import index_tree
    from datasets.manifest import locator_of, write_manifest

    cache = None if args.no_cache else args.out.with_name(args.out.name + ".cache.json")
    rows = index_tree(args.root, labels=args.labels, workers=args.workers, salt=args.salt, raw_ids=args.raw_ids,
                      cache=cache)
    write_manifest(rows, args.out, locations="inline" if args.raw_ids else "beside")
    where = "" if args.raw_ids else f" (file locations in {locator_of(args.out).name}, which names patient folders)"
    print(f"indexed {len(rows)} rows -> {args.out}{where}")
    return 0


def _decathlon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="folder tree with DICOM series and label objects (SEG, RTSTRUCT, NIfTI)")
    p.add_argument("--out", type=Path, required=True, help="Decathlon folder to create (must not exist)")
    p.add_argument("--salt", default=None, help="patient-key salt of the case names (default: env FEWSCAN_SALT)")
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (default: in-process)")


def _decathlon(args: argparse.Namespace) -> int:
    from datasets.to_decathlon import tree_to_decathlon

    spec = tree_to_decathlon(args.root, args.out, salt=args.salt, workers=args.workers)
    names = [n for k, n in spec["labels"].items() if k != "0"]
    print(f"{spec['numTraining']} labelled series -> {args.out} (structures: {', '.join(names)})")
    return 0


# --- convert -------------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="DICOM series folder or file, SEG/RTSTRUCT file, or label map")
    p.add_argument("out", type=Path, help="NIfTI file to write (.nii or .nii.gz)")
    p.add_argument("--series", default=None, metavar="UID", help="series to convert when INPUT holds several")
    p.add_argument("--reference", type=Path, default=None, metavar="SERIES_DIR",
                   help="image series of a SEG/RTSTRUCT/label map (labels come out on its grid)")
    p.add_argument("--stack", type=int, default=None,
                   help="only this stack of a series that splits (mixed orientation/size/echo/type)")
    p.add_argument("--irregular", choices=("error", "resample"), default="error",
                   help="missing slices, non-uniform spacing, gantry tilt: refuse (default) or resample")
    p.add_argument("--masks", action="store_true", help="label objects: one 0/1 volume per segment (4D)")


def _convert(args: argparse.Namespace) -> int:
    from datasets.convert import convert

    for path in convert(args.input, args.out, series_uid=args.series, reference=args.reference,
                        stack=args.stack, irregular=args.irregular, masks=args.masks):
        print(f"wrote {path}")
    return 0


# --- patches -------------------------------------------------------------------------------------------
def _patches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="image (DICOM folder, NIfTI, NRRD, MHA); repeat for more subjects")
    p.add_argument("--labels", type=Path, action="append", required=True, help="label map of each --image, in order")
    p.add_argument("--names", action="append", required=True, metavar="FILE[:TABLE]",
                   help="label-name JSON (e.g. class_map_total.json:total_mr): once for all, or once per --image")
    p.add_argument("--modality", action="append", default=None, choices=("CT", "MR", "auto"),
                   help="once for all or once per --image (default auto: DICOM tag, else CT if air reads < -500)")
    p.add_argument("--structures", default=None, help="comma-separated names to keep (default: all)")
    p.add_argument("--size", type=int, default=32, help="patch side, voxels")
    p.add_argument("--spacing", type=float, default=1.5, help="common in-plane spacing, mm")
    p.add_argument("--slab", type=float, default=10.0,
                   help="z-slab (pseudo-patient group) thickness, mm; 0: one group per subject (real patients)")
    p.add_argument("--per-group", type=int, default=20, help="most patches per (structure, group)")
    p.add_argument("--min-groups", type=int, default=6, help="keep structures in at least this many groups (K+Q)")
    p.add_argument("--ct-window", default="soft_tissue", help="soft_tissue, lung or bone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help=".npz to write (images, labels, class_names, groups)")


def _per_image(values: list[str] | None, n: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) not in (1, n):
        raise FewscanError(f"{flag} given {len(values)} times for {n} images: give it once or once per --image")
    return values * n if len(values) == 1 else values


def _patches(args: argparse.Namespace) -> int:
    from transforms.patches import load_subject, organ_patches, read_names, summary, write_patches

    n = len(args.image)
    if len(args.labels) != n:
        raise FewscanError(f"{n} --image but {len(args.labels)} --labels: give one label map per image")
    names = _per_image(args.names, n, "--names")
    modalities = [None if m in (None, "auto") else m for m in _per_image(args.modality, n, "--modality")]
    subjects = [load_subject(img, lab, read_names(spec), mod)
                for img, lab, spec, mod in zip(args.image, args.labels, names, modalities, strict=True)]
    settings = {k: getattr(args, k) for k in ("size", "spacing", "slab", "per_group", "min_groups", "ct_window",
                                              "seed")}
    patches = organ_patches(
        subjects, size=args.size, spacing=args.spacing, slab_mm=args.slab, per_group=args.per_group,
        min_groups=args.min_groups, ct_window=args.ct_window, seed=args.seed,
        structures=[s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None)
    write_patches(patches, args.out, settings)
    print(summary(patches))
    print(f"wrote {args.out}")
    return 0


# Each task kind is a package whose `task` module is the protocol every verb dispatches on:
# `train(cfg, run_dir, resume)`, `evaluate(run_dir, out, episodes_file, overrides)`, `summary_table(report)`,
# `fixed_episodes(cfg, split, n)`, `adapt(run, support, out, structure)`, `predict(adapted, inputs, out, centre)`.
TASKS: dict[str, str] = {
    "classification": "pipeline.classification.task",
    "segmentation": "pipeline.segmentation.task",
    "registration": "pipeline.registration.task",
}


def task_module(task: str):  # noqa: ANN201 - a module object
    import importlib

    if task not in TASKS:
        raise FewscanError(f"unknown task {task!r} (known: {sorted(TASKS)})")
    return importlib.import_module(TASKS[task])


# --- --set, shared by train, evaluate, episodes and demo ---------------------------------------------
def _key_value(item: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (give positional arguments before --set)")
    return item


def _set_argument(p: argparse.ArgumentParser, text: str) -> None:
    """`--set KEY=VALUE [KEY=VALUE ...]`, repeatable: every item of every flag, in order, in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", type=_key_value, default=[],
                   metavar="KEY=VALUE", help=f"{text} (several per flag, or repeat the flag)")


# --- train -------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    _set_argument(p, "override config values, e.g. --set train.iterations=50 seed=1")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")
    p.add_argument("--resume", action="store_true",
                   help="require OUT/last to continue from (every task kind resumes from it automatically when "
                        "present)")


def _train(args: argparse.Namespace) -> int:
    from pipeline.common.config import load_config
    from pipeline.common.run import discard_failed_run

    fresh = not args.out.exists()
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = task_module(cfg.task).train(cfg, args.out, resume=args.resume)
    except FewscanError:
        discard_failed_run(args.out, fresh)
        raise
    print(f"run directory: {run_dir}")
    return 0


# --- evaluate ----------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory written by `train`")
    p.add_argument("--out", type=Path, default=None, help="report path (default RUN_DIR/report.json)")
    p.add_argument("--episodes", type=Path, default=None, metavar="FILE",
                   help="evaluate on exactly these episodes (written by `episodes`), for paired comparisons")
    _set_argument(p, "evaluate the same weights another way, e.g. --set shots=5 (classification, segmentation: "
                     "episodes.*, seed; registration: registration.instance_steps, instance_lr, adapt_steps, "
                     "adapt_lr; any: train.device, train.threads); writes report_shots5.json etc. beside the "
                     "run's own")


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.common.config import read_yaml
    from pipeline.common.run import check_run_weights, evaluation_files

    if not (args.run_dir / "config.yaml").is_file():
        raise FewscanError(f"{args.run_dir}: not a run directory (no config.yaml); run `train` first")
    task = read_yaml(args.run_dir / "config.yaml").get("task", "classification")
    check_run_weights(args.run_dir)
    module = task_module(task)
    report = module.evaluate(args.run_dir, args.out, episodes_file=args.episodes, overrides=args.overrides)
    print(module.summary_table(report))
    report_path = evaluation_files(args.run_dir, args.overrides, args.out, task)[1]
    print(f"report: {report_path}\npage: {page_path(report_path)}")
    return 0


# --- episodes ----------------------------------------------------------------------------------------
def _episodes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (the one the compared runs train with)")
    _set_argument(p, "override config values, e.g. --set shots=1 seed=2")
    p.add_argument("--split", default="novel", help="which held-out part: novel (default), validation or base")
    p.add_argument("--n", type=int, default=None, help="number of episodes (default: episodes.eval_episodes)")
    p.add_argument("--out", type=Path, required=True, help="episode file (JSON) to write")


def _episodes(args: argparse.Namespace) -> int:
    from pipeline.common.config import load_config
    from pipeline.common.episodes import save_episode_set

    cfg = load_config(args.config, args.overrides)
    if args.n is not None and args.n < 1:
        raise FewscanError("--n must be at least 1")
    records = task_module(cfg.task).fixed_episodes(cfg, args.split, args.n or cfg.episodes.eval_episodes)
    save_episode_set(records, args.out)
    print(f"wrote {len(records)} {cfg.task} episodes ({args.split}) -> {args.out}")
    return 0


# --- register ----------------------------------------------------------------------------------------
def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", type=Path, required=True, help="fixed image (NIfTI, NRRD, MetaImage or DICOM)")
    p.add_argument("--moving", type=Path, required=True, help="moving image, warped onto the fixed grid")
    p.add_argument("--moving-labels", type=Path, default=None, help="label map of the moving image (optional)")
    p.add_argument("--checkpoint", type=Path, required=True, help="registration run directory (or its weights)")
    p.add_argument("--modality", action="append", default=None,
                   help="modality (intensity preset key), e.g. MRI or CT: once for both images, or twice (fixed, "
                        "then moving); default: each image's own (DICOM), else the run's")
    p.add_argument("--out", type=Path, required=True, help="folder for warped image, labels and field")


def _register(args: argparse.Namespace) -> int:
    from pipeline.registration.register import register_files

    summary = register_files(args.fixed, args.moving, args.moving_labels, args.checkpoint, args.out, args.modality)
    print(f"wrote {', '.join(summary['outputs'])} -> {args.out} ({summary['seconds']:.1f} s, "
          f"folding {summary['folding'] * 100:.3f}%)")
    return 0


# --- demo --------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the cohorts and the runs")
    p.add_argument("--task", choices=["all", "classification", "segmentation", "registration"], default="all",
                   help="which journey to run (default all: the three task kinds, then adapt + predict)")
    _set_argument(p, "override values of the classification demo config (configs/demo.yaml)")


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    print(run_demo(args.out, args.task, args.overrides))
    return 0


# --- adapt / predict -----------------------------------------------------------------------------------
def _adapt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory, checkpoint folder (RUN/best, RUN/last) or weights file")
    p.add_argument("--support", type=Path, required=True,
                   help="support CSV (path,label[,centre columns]) or a class-per-folder directory")
    p.add_argument("--out", type=Path, required=True, help="folder for the adapted model")
    p.add_argument("--structure", default=None,
                   help="segmentation runs: structure name (or label value) in the support labels; the support "
                        "is then a CSV of image,label rows (NIfTI / DICOM folder; label map, DICOM-SEG, RTSTRUCT)")


def _run_task(folder: Path) -> str:
    """The task a run, checkpoint or adapted folder was trained for (its config.yaml, or its parent's)."""
    from pipeline.common.config import read_yaml

    for d in (folder, folder.parent):
        if (d / "config.yaml").is_file():
            return str(read_yaml(d / "config.yaml").get("task", "classification"))
    return "classification"


def _adapt(args: argparse.Namespace) -> int:
    print(task_module(_run_task(args.run)).adapt(args.run, args.support, args.out, args.structure))
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapted", type=Path, help="folder written by `adapt`")
    p.add_argument("inputs", type=Path, nargs="*", help="DICOM series folders, NIfTI files or 2D images")
    p.add_argument("--centre", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="classification: the lesion centre of the named 3D inputs, in the run's data.center_frame")
    p.add_argument("--queries", type=Path, default=None,
                   help="classification: a CSV of scans to classify, column path (relative to the CSV) and the "
                        "run's centre columns (data.center_columns, e.g. lps_x,lps_y,lps_z)")
    p.add_argument("--whole-volume", action="store_true",
                   help="classification: classify 3D inputs without a centre by the volume's central crop")
    p.add_argument("--out", type=Path, default=Path("predictions"),
                   help="output folder: predictions.csv/.json (classification), NIfTI masks and DICOM-SEGs "
                        "(segmentation)")


def _predict(args: argparse.Namespace) -> int:
    task = _run_task(args.adapted)
    extra = {"queries": args.queries, "whole_volume": args.whole_volume} if task == "classification" else {}
    if task != "classification" and (args.queries or args.whole_volume or args.centre):
        raise FewscanError(f"{args.adapted}: --queries, --whole-volume and --centre are for classification runs")
    if not args.inputs and not args.queries:
        raise FewscanError("predict: name at least one input scan (or --queries CSV for classification)")
    print(task_module(task).predict(args.adapted, args.inputs, args.out, args.centre, **extra))
    return 0


VERBS: dict[str, Verb] = {
    "synth": (_synth_args, _synth),
    "index": (_index_args, _index),
    "decathlon": (_decathlon_args, _decathlon),
    "convert": (_convert_args, _convert),
    "patches": (_patches_args, _patches),
    "train": (_train_args, _train),
    "evaluate": (_evaluate_args, _evaluate),
    "report": (report_arguments, report_verb),
    "episodes": (_episodes_args, _episodes),
    "adapt": (_adapt_args, _adapt),
    "predict": (_predict_args, _predict),
    "export": (export_arguments, export_verb),
    "register": (_register_args, _register),
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
        check_outputs(args.verb, args)
        return VERBS[args.verb][1](args)
    except FewscanError as err:
        print(f"fewscan {args.verb}: error: {err}", file=sys.stderr)
        return 2


VERB_HELP: dict[str, str] = {
    "synth": "write the seeded synthetic TCIA-style demo cohort (DICOM + NIfTI + findings.csv)",
    "index": "index a folder tree into a manifest CSV",
    "decathlon": "write a segmentation training folder (Decathlon layout) from labelled DICOM series",
    "convert": "convert a DICOM series, SEG, RTSTRUCT or label map to NIfTI (dcm2niix-equivalent geometry)",
    "patches": "cut 2D organ patches from labelled volumes into a classification npz (pseudo-patient z-slab groups)",
    "train": "meta-train from a YAML config into a run directory",
    "evaluate": "evaluate a run on its held-out classes over fixed episodes; writes report.json and report.html",
    "report": "(re)build the self-contained HTML page (report.html) of a run's evaluation report",
    "episodes": "write a fixed evaluation episode file (exact cases per episode) for paired comparisons",
    "adapt": "adapt a trained run to new classes from a few labelled scans (support CSV or class folders)",
    "predict": "per-class probabilities for scans from a model written by `adapt`",
    "export": "write a model from `adapt` as a MONAI Bundle (TorchScript + MONAI transforms) that runs without fewscan",
    "register": "warp a moving image (and labels) onto a fixed one with a registration run; ITK displacement field",
    "demo": "the three task kinds (and adapt + predict) end to end on embedded synthetic data, then a summary",
}

if __name__ == "__main__":
    sys.exit(main())
