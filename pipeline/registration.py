"""The registration task kind: meta-train a deformable network on pairs of one or more tasks, adapt it to a
new task on a few pairs, evaluate against SimpleITK on held-out pairs, and register files from the command line.

Run directory: `config.yaml`, `split.json` (patient keys per group), `pairs.json` (train / adapt / eval pairs),
`untrained.safetensors`, `model.safetensors`, `state.json`, `curves.json`, `report.json`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from datasets.sources import load_label_map
from datasets.volume import FewscanError, Volume, atomic_path
from pipeline.config import Config, to_dict
from pipeline.deformation import warp_array
from pipeline.episodes import episode_loader
from pipeline.methods.registration import (
    Losses,
    RegistrationNet,
    adapted,
    optimiser,
    predict,
    reptile_step,
    train_steps,
)
from pipeline.progress import progress
from pipeline.reg_episodes import (
    SPLITS,
    PairData,
    RegEpisodes,
    fixed_pairs,
    patient_groups,
    preprocess,
    registration_tasks,
    roles,
)
from pipeline.report import write_json
from pipeline.train import load_run_config, load_weights, save_weights, seed_everything

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")
warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")  # MONAI deform.py


def n_labels(pairs: list[dict[str, Any]]) -> int:
    """Number of label values (background included) over the pairs' structure tables."""
    values = [int(k) for p in pairs for k in p["structures"]]
    return max(values, default=0) + 1


def build_net(cfg: Config, shape: tuple[int, ...]) -> RegistrationNet:
    torch.manual_seed(cfg.seed)
    return RegistrationNet(cfg.registration, shape)


# --- training --------------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path) -> Path:
    """Meta-train (Reptile, or joint training) on the training pairs; returns the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    rcfg = cfg.registration
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json({t.name: patient_groups(t, cfg) for t in registration_tasks(cfg)}, run_dir / "split.json")
    pairs = {split: fixed_pairs(cfg, split) for split in SPLITS}
    write_json(pairs, run_dir / "pairs.json")
    if not pairs["train"] or not pairs["eval"]:
        raise FewscanError(f"{cfg.data.root}: no training or evaluation pairs (check registration.* splits)")
    start = time.perf_counter()
    data = PairData(cfg, pairs["train"])
    prep_seconds = time.perf_counter() - start
    model = build_net(cfg, data.shape)
    save_weights(model, run_dir / "untrained.safetensors")
    losses = Losses(rcfg, n_labels(pairs["train"]))
    stream = RegEpisodes(data, cfg, cfg.train.iterations)
    opt = optimiser(model, cfg.train.lr) if rcfg.meta == "joint" else None
    curves: dict[str, list[float]] = {"iteration": [], "loss": []}
    window: list[float] = []
    inner = None  # Reptile's inner Adam state, carried across tasks
    start = time.perf_counter()
    loader = episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch)
    for it, batches in enumerate(progress(loader, total=cfg.train.iterations, desc=f"meta-training ({rcfg.meta})",
                                          unit="task")):
        if opt is None:  # Reptile: one task = one fixed image, one batch of its pairs per inner step
            steps = iter(batches)
            loss, inner = reptile_step(model, losses, lambda s=steps: next(s), rcfg.inner_steps, cfg.train.lr,
                                       rcfg.meta_lr, inner)
        else:
            loss = train_steps(model, losses, lambda b=batches[0]: b, 1, opt)[0]
        window.append(loss)
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            curves["iteration"].append(it + 1)
            curves["loss"].append(float(np.mean(window)))
            window = []
    save_weights(model, run_dir / "model.safetensors")
    write_json({"iterations": cfg.train.iterations, "seconds": time.perf_counter() - start,
                "prepare_seconds": prep_seconds, "train_pairs": len(pairs["train"]), "tasks": len(stream.groups),
                "volume_size": list(data.shape)}, run_dir / "state.json")
    write_json(curves, run_dir / "curves.json")
    return run_dir


# --- evaluation ------------------------------------------------------------------------------------------------
def pair_metrics(warped_labels: np.ndarray, fixed_labels: np.ndarray, ddf: np.ndarray, spacing: tuple[float, ...],
                 structures: dict[str, str]) -> dict[str, Any]:
    """Learn2Reg metrics of one pair: per-structure Dice/HD95 (structures present in the fixed labels), their
    means, share of folded voxels and SD of the log Jacobian determinant."""
    from pipeline.deformation import folding_ratio, jacobian_determinant, log_jacobian_std
    from pipeline.metrics import dice_hd95

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
    from pipeline.metrics import mean_ci95

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
    from pipeline.metrics import mean_ci95

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
    from pipeline.baselines.sitk_registration import register_sitk, warp_labels
    from pipeline.deformation import transform_to_ddf

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


def evaluate(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Adapt the meta-learned network on the adaptation pairs, score it, the unregistered pairs and SimpleITK on
    the held-out pairs; writes `report.json`."""
    import json

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
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


# --- register files (CLI) --------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: Path) -> tuple[Config, RegistrationNet, dict[str, Any]]:
    """Config, network with trained weights and `state.json` of a run directory (or its `.safetensors` file)."""
    import json

    from datasets.volume import InputError

    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    weights = path if path.is_file() else run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file() or not weights.is_file():
        raise InputError(path, "not a registration run (needs config.yaml, state.json and model.safetensors)")
    cfg = load_run_config(run_dir)
    if cfg.task != "registration":
        raise InputError(path, f"a {cfg.task} run, not a registration run")
    state = json.loads((run_dir / "state.json").read_text())
    model = load_weights(build_net(cfg, tuple(state["volume_size"])), weights)
    pairs = json.loads((run_dir / "pairs.json").read_text()) if (run_dir / "pairs.json").is_file() else {}
    state["modality"] = next((p["modality"] for p in pairs.get("train", [])), "")
    return cfg, model, state


def predict_transform(cfg: Config, model: RegistrationNet, fixed: Volume, moving: Volume,
                      modality: str) -> tuple[np.ndarray, Volume, Volume, Any]:
    """Register `moving` to `fixed` (any grids) with a trained network.

    Both are prepared by the run's preset; the fixed one defines the network grid, the moving one is resampled
    onto it in world coordinates (after a SimpleITK affine when `prealign: sitk`).

    Returns:
        The network's DDF `(3, *grid)` (voxels of the grid), the prepared fixed volume (the grid), the prepared
        moving volume on the grid (before the DDF), and the total fixed->moving SimpleITK transform.
    """
    import SimpleITK as sitk

    from pipeline.baselines.sitk_registration import register_sitk
    from pipeline.deformation import ddf_to_itk, resample_to

    grid, _ = preprocess(cfg, fixed, None, 0, modality)
    if grid.array.shape != model.image_size:
        raise FewscanError(f"the prepared fixed image is {list(grid.array.shape)} voxels but the network was trained "
                           f"on {list(model.image_size)}: train with transforms.volume_size set")
    moving_p, _ = preprocess(cfg, moving, None, 0, modality)
    affine = register_sitk(grid, moving_p, "affine", seed=cfg.seed)[1] if cfg.registration.prealign == "sitk" else None
    on_grid = resample_to(moving_p, grid, transform=affine)
    to_tensor = lambda v: torch.from_numpy(np.asarray(v.array, np.float32))[None, None]  # noqa: E731
    ddf = predict(model, to_tensor(on_grid), to_tensor(grid))[0].numpy()
    field = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, grid))
    return ddf, grid, on_grid, field if affine is None else sitk.CompositeTransform([affine, field])


def register_files(fixed_path: Path, moving_path: Path, labels_path: Path | None, checkpoint: Path,
                   out_dir: Path, modality: str | None = None) -> dict[str, Any]:
    """`python -m pipeline register`: write `warped.nii.gz`, `warped_labels.nii.gz` (with labels),
    `displacement.nii.gz` (ITK displacement field on the fixed grid, LPS mm) and `register.json` to `out_dir`.

    The warped outputs are produced by SimpleITK from exactly the field written, so
    `sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))` reproduces them.
    """
    import SimpleITK as sitk

    from datasets.volume import InputError
    from datasets.volume_io import load_volume
    from pipeline.deformation import (
        ddf_to_itk,
        folding_ratio,
        jacobian_determinant,
        log_jacobian_std,
        resample_to,
        transform_to_ddf,
        write_displacement_field,
    )

    start = time.perf_counter()
    cfg, model, state = load_checkpoint(checkpoint)
    fixed, moving = load_volume(Path(fixed_path)), load_volume(Path(moving_path))
    for path, vol in ((fixed_path, fixed), (moving_path, moving)):
        if vol.array.ndim != 3:
            raise InputError(path, f"expected a 3D image, got shape {vol.array.shape}")
    labels = load_label_map(Path(labels_path)) if labels_path is not None else None
    _, _, _, transform = predict_transform(cfg, model, fixed, moving, modality or state["modality"])
    ddf = transform_to_ddf(transform, fixed)  # on the fixed image's own grid
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_displacement_field(ddf, fixed, out_dir / "displacement.nii.gz")
    written = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, fixed))
    outputs = {"warped": resample_to(moving, fixed, transform=written)}
    if labels is not None:
        outputs["warped_labels"] = resample_to(labels, fixed, nearest=True, transform=written)
    for name, vol in outputs.items():
        with atomic_path(out_dir / f"{name}.nii.gz") as tmp:
            vol.to_nifti().to_filename(str(tmp))
    jac = jacobian_determinant(ddf)
    summary = {"seconds": time.perf_counter() - start, "folding": folding_ratio(jac),
               "log_jac_std": log_jacobian_std(jac), "outputs": sorted([*outputs, "displacement"]),
               "field": "ITK displacement field, LPS mm, fixed grid: sitk.DisplacementFieldTransform"}
    write_json(summary, out_dir / "register.json")
    return summary
