"""Registration evaluation: adapt the network on a few pairs of unseen patients, then score held-out pairs.

Learn2Reg metrics (Dice, HD95, folding share, SD of log-Jacobian) next to no registration and SimpleITK affine /
affine + demons on the same pairs, with paired Dice differences; writes `report.json` and the page `report.html`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.volume import FewscanError, InputError
from pipeline.common.config import Config
from pipeline.common.episodes import load_episode_set, save_episode_set
from pipeline.common.metrics import dice_hd95, metric_block, paired_differences
from pipeline.common.page import write_page
from pipeline.common.report import ci_text, paired_lines, text_table, write_json
from pipeline.common.run import (
    evaluation_files,
    load_run_config,
    load_weights,
    pick_device,
    seed_everything,
    set_threads,
)
from pipeline.registration.deformation import warp_array
from pipeline.registration.episodes import PairData, patient_groups, registration_tasks, roles
from pipeline.registration.network import (
    Losses,
    adapted,
    model_device,
    predict,
    refine,
)
from pipeline.registration.train import build_net, n_labels

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")


# --- evaluation ------------------------------------------------------------------------------------------------
def pair_metrics(warped_labels: np.ndarray, fixed_labels: np.ndarray, ddf: np.ndarray, spacing: tuple[float, ...],
                 structures: dict[str, str]) -> dict[str, Any]:
    """Learn2Reg metrics of one pair: per-structure Dice/HD95 (structures present in the fixed labels), their
    means, share of folded voxels and SD of the log Jacobian determinant."""
    from pipeline.registration.deformation import folding_ratio, jacobian_determinant, log_jacobian_std

    per: dict[str, dict[str, float]] = {}
    for value, name in structures.items():
        if int(value) == 0 or not (fixed_labels == int(value)).any():
            continue
        dice, hd95 = dice_hd95(warped_labels == int(value), fixed_labels == int(value), spacing)
        per[name] = {"dice": dice, "hd95": hd95}
    jac = jacobian_determinant(ddf)
    return {"dice": float(np.mean([v["dice"] for v in per.values()])) if per else float("nan"),
            "hd95": float(np.mean([v["hd95"] for v in per.values()])) if per else float("nan"),
            "folding": folding_ratio(jac), "log_jac_std": log_jacobian_std(jac), "per_structure": per}


def _block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± 95% CI over pairs of each metric, and per structure (`metric_block`), plus each pair's Dice."""
    return {**metric_block(rows, ("dice", "hd95", "folding", "log_jac_std", "seconds")),
            "per_pair": {"dice": [float(r["dice"]) for r in rows]}}


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """fewscan minus each SimpleITK baseline, pair by pair on the same pairs: Dice difference mean ± 95% CI
    (`paired_differences`; the unpaired intervals of two methods overlap easily on 20 pairs)."""
    return paired_differences(report["per_pair"]["dice"], {key: report[key]["per_pair"]["dice"] for key in
                                                           ("baseline_affine", "baseline_sitk") if key in report})


def _network_rows(model: torch.nn.Module, data: PairData, losses: Losses, instance_steps: int,
                  instance_lr: float) -> list[dict[str, Any]]:
    """Register every pair with the network (optionally instance-optimised per pair) and score it."""
    rows = []
    for i, pair in enumerate(data.pairs):
        mv, fv, ml, fl = data.volumes(i)
        start = time.perf_counter()
        batch = data.batch([i])
        # unsupervised: the evaluated pair's labels are never used
        ddf = refine(predict(model, batch[0], batch[1]), batch[0], batch[1], losses, instance_steps,
                     instance_lr, model_device(model))[0].numpy()
        seconds = time.perf_counter() - start + data.aligned.get(i, (None, None, 0.0))[2]
        warped = warp_array(ml.array, ddf, nearest=True)
        rows.append({**pair_metrics(warped, fl.array, ddf, fv.spacing, pair["structures"]), "seconds": seconds})
    return rows


def _sitk_rows(data: PairData, kind: str) -> list[dict[str, Any]]:
    """SimpleITK registration of the same prepared pairs (never pre-aligned: it does its own affine)."""
    from pipeline.registration.classical import register_sitk, warp_labels
    from pipeline.registration.deformation import transform_to_ddf

    rows = []
    for pair in data.pairs:
        moving, fixed = roles(pair)
        (mv, ml), (fv, fl) = data.cases[(moving["image"], pair["channel"])], data.cases[(fixed["image"],
                                                                                         pair["channel"])]
        _, transform, seconds = register_sitk(fv, mv, kind, seed=data.cfg.seed)
        warped = warp_labels(ml, fv, transform).array
        rows.append({**pair_metrics(warped, fl.array, transform_to_ddf(transform, fv), fv.spacing,
                                    pair["structures"]), "seconds": seconds})
    return rows


# --- the pairs ---------------------------------------------------------------------------------------------------
def evaluation_pairs(cfg: Config, run_dir: Path, episodes_path: Path,
                     episodes_file: Path | None = None) -> tuple[list[dict[str, Any]], Path]:
    """The pairs to score and the file they come from: `episodes_file` (checked), else `episodes_path` when an
    earlier `evaluate --episodes` copied one there, else the `eval` pairs fixed at training (`pairs.json`).

    Raises:
        InputError: the file (named) holds other episodes than registration pairs, or a pair that is not two
            labelled held-out (eval) cases of one task of the run's data.
    """
    if episodes_file is None and not episodes_path.exists():
        return json.loads((run_dir / "pairs.json").read_text())["eval"], run_dir / "pairs.json"
    source = Path(episodes_file if episodes_file is not None else episodes_path)
    pairs = load_episode_set(source, "registration")
    check_pairs(pairs, cfg, source)
    return pairs, source


def check_pairs(pairs: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """Check pair records (as `fixed_pairs` writes them) against the run's data: each pair is one moving and one
    fixed labelled case of the held-out (`eval`) patients of one task, paired as `registration.pairing` says,
    and names that task's channel, modality and structures.

    Raises:
        InputError: naming `path`, the pair and what is wrong.
    """
    tasks = {t.name: t for t in registration_tasks(cfg) if t.primary}
    for n, pair in enumerate(pairs):
        task = tasks.get(pair.get("task"))
        if task is None:
            raise InputError(path, f"pair {n}: task {pair.get('task')!r} is not one of this run's ({sorted(tasks)})")
        expected = {"channel": task.channel, "modality": task.modality,
                    "structures": {str(k): v for k, v in task.structures.items()}}
        for key, value in expected.items():
            if pair.get(key) != value:
                raise InputError(path, f"pair {n}: {key} {pair.get(key)!r}, but {task.name} has {value!r}")
        held = set(patient_groups(task, cfg)["eval"])
        known = {c.case_id: c for c in task.cases if c.patient_key in held}
        if sorted(c["role"] for c in pair["cases"]) != ["fixed", "moving"]:
            raise InputError(path, f"pair {n}: a pair is one moving and one fixed case")
        for case in pair["cases"]:
            reg = known.get(case["case_id"])
            if reg is None:
                raise InputError(path, f"pair {n}: case {case['case_id']!r} is not a held-out (eval) case of "
                                 f"{task.name}")
            if (case.get("image"), case.get("label")) != (reg.image, reg.label) or reg.label is None:
                raise InputError(path, f"pair {n}: case {case['case_id']!r} must name this run's image "
                                 f"{reg.image} and label map {reg.label} (Dice needs labels on both sides)")
        moving, fixed = (known[c["case_id"]] for c in roles(pair))
        if moving is fixed or (moving.patient_key != fixed.patient_key) != (cfg.registration.pairing == "inter"):
            raise InputError(path, f"pair {n}: not an {cfg.registration.pairing}-subject pair")


# --- evaluate ------------------------------------------------------------------------------------------------
def evaluate(run_dir: Path, out: Path | None = None, episodes_file: Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Adapt the meta-learned network on the adaptation pairs, score it, the unregistered pairs and SimpleITK on
    the held-out pairs; writes `report.json` and `report.html`.

    With `episodes_file` (pairs from `python -m pipeline episodes`), exactly those pairs are scored (checked before
    anything is written, then copied into the run as `episodes.json`). `overrides` (`--set
    registration.instance_steps=5`) change the test-time adaptation, into their own files (`evaluation_files`).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    episodes_path, out, _ = evaluation_files(run_dir, overrides, out, cfg.task)
    set_threads(cfg)
    seed_everything(cfg.seed)
    pairs, source = evaluation_pairs(cfg, run_dir, episodes_path, episodes_file)
    evaluation = PairData(cfg, pairs, labels_required=True)
    check_trained_shape(run_dir, cfg, evaluation.shape)
    if episodes_file is not None and source.resolve() != episodes_path.resolve():
        save_episode_set(pairs, episodes_path)
    adapt_pairs = json.loads((run_dir / "pairs.json").read_text())["adapt"]
    losses = Losses(cfg.registration, n_labels(pairs))
    model = load_weights(build_net(cfg, evaluation.shape), run_dir / "model.safetensors")
    model = model.to(pick_device(cfg.train.device))  # train.device, auto: CUDA when present
    report: dict[str, Any] = {"task": "registration", "method": f"{cfg.registration.meta}+{cfg.registration.network}",
                              "episodes": len(pairs), "pairs": len(pairs), "adapt_pairs": len(adapt_pairs),
                              "tasks": sorted({p["task"] for p in pairs})}
    report["unregistered"] = _block(_identity_rows(evaluation))
    report.update(_network_blocks(cfg, model, losses, evaluation, adapt_pairs))
    report.update(_baseline_blocks(cfg, evaluation))
    report["paired"] = paired(report)
    report["evaluation_seconds"] = time.perf_counter() - started
    write_json(report, out)
    write_page(run_dir, out)
    return report


def check_trained_shape(run_dir: Path, cfg: Config, shape: tuple[int, ...]) -> None:
    """Refuse held-out volumes of another shape than the training ones (possible only without
    `transforms.volume_size`, which fixes the shape of every volume).

    Raises:
        FewscanError: the shapes differ.
    """
    state = run_dir / "state.json"
    trained = tuple(json.loads(state.read_text()).get("volume_size", shape)) if state.is_file() else shape
    if tuple(shape) != trained:
        raise FewscanError(f"{cfg.data.root}: the held-out volumes are {list(shape)} voxels but the network was "
                           f"trained on {list(trained)}: train with transforms.volume_size set")


def _identity_rows(data: PairData) -> list[dict[str, Any]]:
    """The pairs scored without registration (a zero displacement field)."""
    rows = []
    for i, pair in enumerate(data.pairs):
        _, fv, ml, fl = data.volumes(i)
        rows.append({**pair_metrics(ml.array, fl.array, np.zeros((3, *data.shape), np.float32), fv.spacing,
                                    pair["structures"]), "seconds": 0.0})
    return rows


def _network_blocks(cfg: Config, model: torch.nn.Module, losses: Losses, evaluation: PairData,
                    adapt_pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The network's block (top level of the report), after adapting on `adapt_pairs` when there are any and
    `adapt_steps` > 0; then also `meta_init` (the meta-learned weights before adaptation) and `adapt_seconds`."""
    rcfg = cfg.registration
    out: dict[str, Any] = {}
    if adapt_pairs and rcfg.adapt_steps:
        out["meta_init"] = _block(_network_rows(model, evaluation, losses, rcfg.instance_steps, rcfg.instance_lr))
        support = PairData(cfg, adapt_pairs)
        rng = np.random.default_rng(cfg.seed)
        size = min(rcfg.pairs_per_task, len(adapt_pairs))
        start = time.perf_counter()
        model = adapted(model, losses, lambda: support.batch(list(rng.choice(len(adapt_pairs), size, False))),
                        rcfg.adapt_steps, rcfg.adapt_lr, labels=True)
        out["adapt_seconds"] = time.perf_counter() - start
    out.update(_block(_network_rows(model, evaluation, losses, rcfg.instance_steps, rcfg.instance_lr)))
    return out


def _baseline_blocks(cfg: Config, evaluation: PairData) -> dict[str, Any]:
    """`baseline_affine` and `baseline_sitk` (SimpleITK on the same pairs), as configured."""
    rcfg, out = cfg.registration, {}
    if rcfg.baseline_affine:
        out["baseline_affine"] = {"kind": "affine", **_block(_sitk_rows(evaluation, "affine"))}
    if rcfg.baseline != "none":
        out["baseline_sitk"] = {"kind": rcfg.baseline, **_block(_sitk_rows(evaluation, rcfg.baseline))}
    return out


def summary_table(report: dict[str, Any]) -> str:
    """Plain-text table: Dice, HD95, folding, SD log Jacobian and seconds per pair for every method."""
    rows = [("unregistered", report["unregistered"])]
    if "baseline_affine" in report:
        rows.append(("SimpleITK affine", report["baseline_affine"]))
    if "baseline_sitk" in report:
        rows.append((f"SimpleITK {report['baseline_sitk']['kind']}", report["baseline_sitk"]))
    if "meta_init" in report:
        rows.append(("fewscan meta-init", report["meta_init"]))
    rows.append((f"fewscan {report['method']}" + (" adapted" if "meta_init" in report else ""), report))
    cells = [[name, ci_text(m["dice"]), ci_text(m["hd95"], digits=2), f"{m['folding']['mean'] * 100:.3f}",
              f"{m['log_jac_std']['mean']:.3f}", f"{m['seconds']['mean']:.2f}"]
             for name, m in ((name, block["metrics"]) for name, block in rows)]
    names = {key: f"SimpleITK {report[key]['kind']}" for key in report.get("paired", {})}
    return text_table(f"registration: {report['pairs']} held-out pairs of {', '.join(report['tasks'])}, "
                      f"adapted on {report['adapt_pairs']} pairs; mean [95% CI]",
                      ["method", "Dice", "HD95 mm", "folding %", "SD logJ", "s/pair"], cells,
                      paired_lines(report, "fewscan", names))
