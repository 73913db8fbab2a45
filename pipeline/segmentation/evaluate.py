"""Segmentation evaluation: every method and baseline on fixed held-out-structure episodes.

`evaluate` adds to a run directory `episodes.json`,
`report.json`, `dice.png` (box plot per structure and method) and `overlay_<structure>.png`.

Evaluation protocol. 3D mode: the whole support volume(s) and their masks give the prototypes (or the adaptation
data); the whole query volume is segmented (sliding windows of `crop`). 2D mode follows SSL-ALPNet: only the
query slices between the first and last slice holding the structure are segmented (the protocol assumes that
range is known), split into `chunks` equal parts; chunk c of the query uses the middle slice of chunk c of each
support's structure range. Every method, the atlas baseline included, is scored under the same protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.volume import FewscanError, Volume
from pipeline.common.config import Config
from pipeline.common.metrics import dice_hd95, mean_ci95
from pipeline.common.progress import progress
from pipeline.common.report import plot_dice_boxes, plot_overlay, write_json
from pipeline.common.run import evaluation_files, load_run_config, load_weights, set_threads
from pipeline.segmentation.data import Case, load_cases
from pipeline.segmentation.episodes import fixed_episodes, role_ids
from pipeline.segmentation.train import build_model

log = logging.getLogger(__name__)

EMPTY_MASK_POLICY = ("Dice/HD95 per query with monai.metrics (no aggregate()); prediction empty but truth not: "
                     "Dice 0, HD95 = volume diagonal in mm; both empty: Dice 1, HD95 0")
Predictor = Callable[[torch.Tensor], torch.Tensor]








# --- running one method on one query ------------------------------------------------------------------
def axial_slices(image: np.ndarray, ks: np.ndarray) -> torch.Tensor:
    """Axial slices `ks` of `(I, J, K)` as `(len(ks), 1, I, J)`."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image[:, :, ks], 2, 0))[:, None]).float()


def foreground_slices(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(mask.any(axis=(0, 1)))[0]


def run_learned(fit: Callable[[list[torch.Tensor], list[torch.Tensor]], Predictor], mode: str,
                supports: list[tuple[np.ndarray, np.ndarray]], query: np.ndarray, zrange: tuple[int, int] | None,
                chunks: int, no_grad_fit: bool) -> np.ndarray:
    """Segment one query volume `(I, J, K)` with a fitted predictor; returns a bool mask of the same shape.

    Args:
        fit: support images/masks (lists of `(n, 1, *S)`) -> predictor `x -> logits (B, 2, *S)`.
        supports: `(image, mask)` volume pairs.
        zrange: 2D only: first and last query slice to segment (SSL-ALPNet protocol); None = every slice, one chunk.
        chunks: 2D: number of chunks (1 = every support structure slice serves every query slice).
        no_grad_fit: fitting needs no gradients (prototypes); fine-tuning and MAML need them.
    """
    grad = torch.no_grad() if no_grad_fit else torch.enable_grad()
    pred = np.zeros(query.shape, bool)
    if mode == "3d":
        with grad:
            predictor = fit([torch.from_numpy(s[0])[None, None].float() for s in supports],
                            [torch.from_numpy(s[1].astype(np.float32))[None, None] for s in supports])
        with torch.no_grad():
            return predictor(torch.from_numpy(query)[None, None].float()).argmax(1)[0].numpy() == 1
    ks = np.arange(zrange[0], zrange[1] + 1) if zrange is not None else np.arange(query.shape[2])
    n_chunks = chunks if zrange is not None else 1
    for c, kq in enumerate(np.array_split(ks, n_chunks)):
        if len(kq) == 0:
            continue
        images, masks = [], []
        for img, msk in supports:
            sk = foreground_slices(msk)
            if n_chunks > 1:
                part = np.array_split(sk, n_chunks)[c]
                sk = np.array([part[len(part) // 2]]) if len(part) else sk[[len(sk) // 2]]
            images.append(axial_slices(img, sk))
            masks.append(axial_slices(msk.astype(np.float32), sk))
        with grad:
            predictor = fit(images, masks)
        with torch.no_grad():  # one slice at a time: prototype scores are (slices, prototypes, H, W) in memory
            x = axial_slices(query, kq)
            labels = torch.cat([predictor(x[i:i + 1]).argmax(1) for i in range(len(x))])
            pred[:, :, kq] = np.moveaxis(labels.numpy() == 1, 0, 2)
    return pred


def _spacing(case: Case) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(case.affine[:3, :3], axis=0))


def method_runners(cfg: Config, run_dir: Path) -> dict[str, Callable[..., np.ndarray]]:
    """Name -> `runner(supports [(img, mask)], query Case, structure, zrange) -> bool mask` for every method."""
    from pipeline.segmentation.finetune import fit_finetune
    from pipeline.segmentation.maml import fit_maml
    from pipeline.segmentation.proto import backbone_divisor, fit_proto

    scfg = cfg.segmentation
    roi = tuple(scfg.crop) if scfg.mode == "3d" else None
    runners: dict[str, Callable[..., np.ndarray]] = {}
    for name, weights in ((scfg.method, "model.safetensors"), ("untrained", "untrained.safetensors")):
        model = load_weights(build_model(cfg), run_dir / weights).eval()
        if scfg.method == "proto":
            fit = (lambda m: lambda xs, ms: fit_proto(m, xs, ms, roi))(model)
            runners[name] = (lambda f: lambda sup, q, s, z: run_learned(f, scfg.mode, sup, q.image, z, scfg.chunks,
                                                                        True))(fit)
        else:
            fit = (lambda m: lambda xs, ms: fit_maml(m, scfg, xs, ms, cfg.seed))(model)
            runners[name] = (lambda f: lambda sup, q, s, z: run_learned(f, scfg.mode, sup, q.image, z, 1,
                                                                        False))(fit)
    if "finetune" in scfg.baselines:
        trained = load_weights(build_model(cfg), run_dir / "model.safetensors")
        if scfg.method == "proto":
            backbone, div, head = trained.backbone, trained.divisor, True
        else:  # the MAML U-Net already has a 2-channel output: fine-tune it whole
            backbone, div, head = trained, backbone_divisor(scfg), False
        fit = lambda xs, ms: fit_finetune(backbone, div, scfg, xs, ms, cfg.seed, head=head)  # noqa: E731
        runners["finetune"] = lambda sup, q, s, z: run_learned(fit, scfg.mode, sup, q.image, z, 1, False)
    if "atlas" in scfg.baselines:
        from pipeline.segmentation.atlas import atlas_segment

        def atlas(sup: list[tuple[np.ndarray, np.ndarray]], q: Case, s: str, z: tuple[int, int] | None,
                  affines: list[np.ndarray] | None = None) -> np.ndarray:
            vols = [(Volume(img, aff), Volume(msk.astype(np.uint8), aff)) for (img, msk), aff in
                    zip(sup, affines or [q.affine] * len(sup), strict=True)]
            mask, _ = atlas_segment(vols, Volume(q.image, q.affine), seed=cfg.seed)
            if z is not None:  # same slice-range protocol as the 2D learned methods
                keep = np.zeros(mask.shape[2], bool)
                keep[z[0]:z[1] + 1] = True
                mask &= keep[None, None, :]
            return mask

        runners["atlas"] = atlas
    return runners


# --- evaluate -----------------------------------------------------------------------------------------
def evaluate(run_dir: Path, out: Path | None = None, episodes_file: Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Score every method on the fixed held-out-structure episodes; writes the report, box plot and overlays.

    `overrides` (`--set shots=5`) evaluate the same weights another way, into their own files (`evaluation_files`).
    """
    if episodes_file is not None:
        raise FewscanError("evaluate --episodes is not supported for this task kind yet")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    episodes_path, out, suffix = evaluation_files(run_dir, overrides, out)
    scfg = cfg.segmentation
    set_threads(cfg)
    cases = load_cases(cfg)
    by_id = {c.case_id: c for c in cases}
    if episodes_path.exists():
        import json

        episodes = json.loads(episodes_path.read_text())
    else:
        episodes = fixed_episodes(cfg, "test", cfg.episodes.eval_episodes, cases)
        write_json(episodes, episodes_path)
    runners = method_runners(cfg, run_dir)
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {n: {} for n in runners}
    seconds: dict[str, list[float]] = {n: [] for n in runners}
    overlaid: set[str] = set()
    for i, ep in enumerate(progress(episodes, desc="evaluating", unit="episode")):
        s = ep["structure"]
        sup_cases = [by_id[c] for c in role_ids(ep, "support")]
        supports = [(c.image, c.mask(s)) for c in sup_cases]
        for qid in role_ids(ep, "query"):
            q = by_id[qid]
            truth = q.mask(s)
            ks = np.nonzero(truth.any(axis=(0, 1)))[0]
            zrange = (int(ks[0]), int(ks[-1])) if scfg.mode == "2d" else None
            for name, run in runners.items():
                t0 = time.perf_counter()
                pred = (run(supports, q, s, zrange, [c.affine for c in sup_cases]) if name == "atlas"
                        else run(supports, q, s, zrange))
                seconds[name].append(time.perf_counter() - t0)
                scores[name].setdefault(s, []).append((i, *dice_hd95(pred, truth, _spacing(q))))
                if name == scfg.method and s not in overlaid and len(overlaid) < scfg.overlays:
                    overlaid.add(s)  # one overlay per structure: its first episode
                    k, ks_s = int(np.argmax(truth.sum((0, 1)))), int(np.argmax(supports[0][1].sum((0, 1))))
                    plot_overlay(supports[0][0][:, :, ks_s], supports[0][1][:, :, ks_s], q.image[:, :, k],
                                 truth[:, :, k], pred[:, :, k], f"{s}: episode {i}, query slice {k}",
                                 out.parent / f"overlay_{s}{suffix}.png")
    blocks = {n: _block(scores[n], seconds[n]) for n in runners}
    per_structure_dice = {n: _dice_by_structure(b["per_episode"]) for n, b in blocks.items()}  # for the box plot
    main = blocks.pop(scfg.method)
    report = {"task": "segmentation", "method": scfg.method, "mode": scfg.mode, "supervision": scfg.supervision,
              "episodes": len(episodes), "shots": cfg.episodes.shots, "queries": cfg.episodes.queries,
              "structures": sorted({e["structure"] for e in episodes}), "empty_mask_policy": EMPTY_MASK_POLICY,
              **main, "untrained": blocks.pop("untrained"), **{f"baseline_{n}": b for n, b in blocks.items()}}
    report["paired"] = paired(report)
    write_json(report, out)
    plot_dice_boxes(per_structure_dice, out.with_name(f"dice{suffix}.png"))
    return report


def _dice_by_structure(per_episode: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per structure, one Dice per episode (mean over that episode's queries), from a block's `per_episode`."""
    out: dict[str, list[float]] = {}
    for e in per_episode:
        out.setdefault(e["structure"], []).append(e["dice"])
    return out


def _block(per_structure: dict[str, list[tuple[int, float, float]]], seconds: list[float]) -> dict[str, Any]:
    """`metrics` and `per_structure` (Dice, HD95: mean and 95% CI over episodes) plus seconds per query."""
    per, all_d, all_h, episodes = {}, [], [], []
    for s, rows in sorted(per_structure.items()):
        eps: dict[int, list[tuple[float, float]]] = {}
        for i, d, h in rows:
            eps.setdefault(i, []).append((d, h))
        d = [float(np.mean([x[0] for x in v])) for v in eps.values()]
        h = [float(np.mean([x[1] for x in v])) for v in eps.values()]
        per[s] = {"dice": mean_ci95(d), "hd95": mean_ci95(h)}
        all_d += d
        all_h += h
        episodes += [{"episode": i, "structure": s, "dice": dv, "hd95": hv}
                     for i, dv, hv in zip(eps, d, h, strict=True)]
    return {"metrics": {"dice": mean_ci95(all_d), "hd95": mean_ci95(all_h)}, "per_structure": per,
            "per_episode": sorted(episodes, key=lambda e: e["episode"]),
            "seconds_per_query": float(np.mean(seconds)) if seconds else 0.0}


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """The method minus each baseline (and the untrained weights), episode by episode: Dice difference, mean ± 95% CI.

    Every method segments the same queries from the same supports, so the paired difference says whether the
    method is lower on the same episodes, which two overlapping unpaired intervals cannot. The episodes row of
    `episodes.json` with the same index names the structure and cases (by id) of each `per_episode` entry.
    """
    ours = np.asarray([e["dice"] for e in report["per_episode"]])
    return {key: {"dice": mean_ci95(list(ours - np.asarray([e["dice"] for e in report[key]["per_episode"]])))}
            for key in report if key == "untrained" or key.startswith("baseline_")}


def summary_table(report: dict[str, Any]) -> str:
    """Text table: one row per method (Dice and HD95 with 95% CIs, seconds per query), then per structure."""
    blocks = {report["method"]: report, "untrained": report["untrained"],
              **{k.removeprefix("baseline_"): v for k, v in report.items() if k.startswith("baseline_")}}
    lines = [f"{report['shots']}-shot {report['mode']} segmentation of {report['structures']}, "
             f"{report['episodes']} episodes ({report['supervision']}-supervised {report['method']})",
             f"  {'method':<10} {'Dice':>6}  {'95% CI':<16} {'HD95 mm':>8}  {'s/query':>8}"]
    for name, b in blocks.items():
        d, h = b["metrics"]["dice"], b["metrics"]["hd95"]
        lines.append(f"  {name:<10} {d['mean']:6.3f}  [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]  {h['mean']:8.1f}  "
                     f"{b['seconds_per_query']:8.2f}")
    for s, m in report["per_structure"].items():
        lo, hi = m["dice"]["ci95"]
        lines.append(f"  {report['method']} {s}: Dice {m['dice']['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
    for key, diff in report.get("paired", {}).items():
        d = diff["dice"]
        lines.append(f"  paired Dice, {report['method']} minus {key.removeprefix('baseline_')}: {d['mean']:+.3f} "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    return "\n".join(lines)
