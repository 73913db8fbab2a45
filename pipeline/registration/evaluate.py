"""Registration evaluation: adapt the network on a few pairs of unseen patients, then score held-out pairs.

Learn2Reg metrics (Dice, HD95, folding share, SD of log-Jacobian) next to no registration and SimpleITK affine /
affine + demons on the same pairs, with paired Dice differences; writes `report.json`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.volume import FewscanError
from pipeline.common.report import write_json
from pipeline.common.run import load_run_config, load_weights, seed_everything, set_threads
from pipeline.registration.deformation import warp_array
from pipeline.registration.episodes import (
    PairData,
    roles,
)
from pipeline.registration.network import (
    Losses,
    adapted,
    predict,
)
from pipeline.registration.train import build_net, n_labels

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")
warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")  # MONAI deform.py








# --- evaluation ------------------------------------------------------------------------------------------------
def pair_metrics(warped_labels: np.ndarray, fixed_labels: np.ndarray, ddf: np.ndarray, spacing: tuple[float, ...],
                 structures: dict[str, str]) -> dict[str, Any]:
    """Learn2Reg metrics of one pair: per-structure Dice/HD95 (structures present in the fixed labels), their
    means, share of folded voxels and SD of the log Jacobian determinant."""
    from pipeline.common.metrics import dice_hd95
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
    """Mean ± 95% CI over pairs of each metric, and per structure."""
    from pipeline.common.metrics import mean_ci95

    metrics = {k: mean_ci95([r[k] for r in rows if np.isfinite(r[k])] or [float("nan")])
               for k in ("dice", "hd95", "folding", "log_jac_std", "seconds")}
    names = sorted({n for r in rows for n in r["per_structure"]})
    per = {n: {k: mean_ci95([r["per_structure"][n][k] for r in rows if n in r["per_structure"]])
               for k in ("dice", "hd95")} for n in names}
    return {"metrics": metrics, "per_structure": per, "per_pair": {"dice": [float(r["dice"]) for r in rows]}}


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """fewscan minus each SimpleITK baseline, pair by pair on the same pairs: Dice difference mean ± 95% CI.

    The unpaired intervals of two methods overlap easily on 20 pairs; the paired difference says whether fewscan's
    Dice is lower on the same pairs.
    """
    from pipeline.common.metrics import mean_ci95

    ours = np.asarray(report["per_pair"]["dice"])
    return {key: {"dice": mean_ci95(list(ours - np.asarray(report[key]["per_pair"]["dice"])))}
            for key in ("baseline_affine", "baseline_sitk") if key in report}


def _network_rows(model: torch.nn.Module, data: PairData, losses: Losses, instance_steps: int,
                  instance_lr: float) -> list[dict[str, Any]]:
    """Register every pair with the network (optionally instance-optimised per pair) and score it."""
    rows = []
    for i, pair in enumerate(data.pairs):
        mv, fv, ml, fl = data.volumes(i)
        start = time.perf_counter()
        batch = data.batch([i])
        net = model
        if instance_steps:  # unsupervised: the evaluated pair's labels are never used
            net = adapted(model, losses, lambda b=batch: b, instance_steps, instance_lr, labels=False)
        ddf = predict(net, batch[0], batch[1])[0].numpy()
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


def evaluate(run_dir: Path, out: Path | None = None, episodes_file: Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Adapt the meta-learned network on the adaptation pairs, score it, the unregistered pairs and SimpleITK on
    the held-out pairs; writes `report.json`."""
    if episodes_file is not None:
        raise FewscanError("evaluate --episodes is not supported for this task kind yet")
    import json

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    set_threads(cfg)
    rcfg = cfg.registration
    seed_everything(cfg.seed)
    pairs = json.loads((run_dir / "pairs.json").read_text())
    evaluation = PairData(cfg, pairs["eval"])
    if any(evaluation.volumes(i)[2] is None or evaluation.volumes(i)[3] is None for i in range(len(pairs["eval"]))):
        raise FewscanError(f"{cfg.data.root}: evaluation pairs need label maps on both sides for Dice")
    losses = Losses(rcfg, n_labels(pairs["eval"]))
    model = load_weights(build_net(cfg, evaluation.shape), run_dir / "model.safetensors")
    report: dict[str, Any] = {"task": "registration", "method": f"{rcfg.meta}+{rcfg.network}",
                              "episodes": len(pairs["eval"]), "pairs": len(pairs["eval"]),
                              "adapt_pairs": len(pairs["adapt"]), "tasks": sorted({p["task"] for p in pairs["eval"]})}
    identity = [{**pair_metrics(evaluation.volumes(i)[2].array, evaluation.volumes(i)[3].array,
                                np.zeros((3, *evaluation.shape), np.float32), evaluation.volumes(i)[1].spacing,
                                p["structures"]), "seconds": 0.0} for i, p in enumerate(pairs["eval"])]
    report["unregistered"] = _block(identity)
    if pairs["adapt"] and rcfg.adapt_steps:
        report["meta_init"] = _block(_network_rows(model, evaluation, losses, rcfg.instance_steps, rcfg.instance_lr))
        support = PairData(cfg, pairs["adapt"])
        rng = np.random.default_rng(cfg.seed)
        size = min(rcfg.pairs_per_task, len(pairs["adapt"]))
        start = time.perf_counter()
        model = adapted(model, losses, lambda: support.batch(list(rng.choice(len(pairs["adapt"]), size, False))),
                        rcfg.adapt_steps, rcfg.adapt_lr, labels=True)
        report["adapt_seconds"] = time.perf_counter() - start
    report.update(_block(_network_rows(model, evaluation, losses, rcfg.instance_steps, rcfg.instance_lr)))
    if rcfg.baseline_affine:
        report["baseline_affine"] = {"kind": "affine", **_block(_sitk_rows(evaluation, "affine"))}
    if rcfg.baseline != "none":
        report["baseline_sitk"] = {"kind": rcfg.baseline, **_block(_sitk_rows(evaluation, rcfg.baseline))}
    report["paired"] = paired(report)
    write_json(report, out or run_dir / "report.json")
    return report


def summary_table(report: dict[str, Any]) -> str:
    """Plain-text table: Dice, HD95, folding, SD log Jacobian and seconds per pair for every method."""
    def fmt(m: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
        low, high = m["ci95"]
        return f"{m['mean'] * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"

    rows = [("unregistered", report["unregistered"])]
    if "baseline_affine" in report:
        rows.append(("SimpleITK affine", report["baseline_affine"]))
    if "baseline_sitk" in report:
        rows.append((f"SimpleITK {report['baseline_sitk']['kind']}", report["baseline_sitk"]))
    if "meta_init" in report:
        rows.append(("fewscan meta-init", report["meta_init"]))
    rows.append((f"fewscan {report['method']}" + (" adapted" if "meta_init" in report else ""), report))
    lines = [f"registration: {report['pairs']} held-out pairs of {', '.join(report['tasks'])}, "
             f"adapted on {report['adapt_pairs']} pairs; mean [95% CI]",
             f"{'method':<34}{'Dice':<24}{'HD95 mm':<24}{'folding %':<12}{'SD logJ':<10}{'s/pair':<8}"]
    for name, block in rows:
        m = block["metrics"]
        lines.append(f"{name:<34}{fmt(m['dice']):<24}{fmt(m['hd95'], digits=2):<24}{m['folding']['mean'] * 100:<12.3f}"
                     f"{m['log_jac_std']['mean']:<10.3f}{m['seconds']['mean']:<8.2f}")
    for key, diff in report.get("paired", {}).items():
        lines.append(f"paired Dice, fewscan minus SimpleITK {report[key]['kind']}: {fmt(diff['dice'])}")
    return "\n".join(lines)






