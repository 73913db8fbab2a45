"""Segmentation evaluation: every method and baseline on fixed held-out-structure episodes.

`evaluate` adds to a run directory `episodes.json` (the episodes scored, or a copy of `evaluate --episodes FILE`),
`report.json`, `dice.png` (box plot per structure and method), `overlay_<structure>.png` and the page
`report.html` (`pipeline.common.page`).

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

from datasets.volume import InputError, Volume
from pipeline.common.config import Config
from pipeline.common.episodes import load_episode_set, save_episode_set
from pipeline.common.metrics import dice_hd95, metric_block, paired_differences
from pipeline.common.page import write_page
from pipeline.common.progress import progress
from pipeline.common.report import ci_text, paired_lines, plot_dice_boxes, plot_overlay, text_table, write_json
from pipeline.common.run import evaluation_files, load_run_config, load_weights, pick_device, set_threads
from pipeline.segmentation.data import Case, load_cases, split_patients, split_structures
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
                chunks: int, no_grad_fit: bool, device: torch.device | None = None) -> np.ndarray:
    """Segment one query volume `(I, J, K)` with a fitted predictor; returns a bool mask of the same shape.

    Args:
        fit: support images/masks (lists of `(n, 1, *S)`) -> predictor `x -> logits (B, 2, *S)`.
        supports: `(image, mask)` volume pairs.
        zrange: 2D only: first and last query slice to segment (SSL-ALPNet protocol); None = every slice, one chunk.
        chunks: 2D: number of chunks (1 = every support structure slice serves every query slice).
        no_grad_fit: fitting needs no gradients (prototypes); fine-tuning and MAML need them.
        device: where the predictor's network is (default: the CPU); volumes are sliced on the CPU and moved.
    """
    device = device or torch.device("cpu")
    grad = torch.no_grad() if no_grad_fit else torch.enable_grad()
    pred = np.zeros(query.shape, bool)
    if mode == "3d":
        with grad:
            predictor = fit([torch.from_numpy(s[0])[None, None].float().to(device) for s in supports],
                            [torch.from_numpy(s[1].astype(np.float32))[None, None].to(device) for s in supports])
        with torch.no_grad():
            x = torch.from_numpy(query)[None, None].float().to(device)
            return predictor(x).argmax(1)[0].cpu().numpy() == 1
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
            images.append(axial_slices(img, sk).to(device))
            masks.append(axial_slices(msk.astype(np.float32), sk).to(device))
        with grad:
            predictor = fit(images, masks)
        with torch.no_grad():  # one slice at a time: prototype scores are (slices, prototypes, H, W) in memory
            x = axial_slices(query, kq)
            labels = torch.cat([predictor(x[i:i + 1].to(device)).argmax(1).cpu() for i in range(len(x))])
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
    device = pick_device(cfg.train.device)
    runners: dict[str, Callable[..., np.ndarray]] = {}
    if scfg.method == "propagate":
        runners.update(propagation_runners(cfg, run_dir))
    for name, weights in (() if scfg.method == "propagate" else
                          ((scfg.method, "model.safetensors"), ("untrained", "untrained.safetensors"))):
        model = load_weights(build_model(cfg), run_dir / weights).to(device).eval()
        if scfg.method == "proto":
            fit = (lambda m: lambda xs, ms: fit_proto(m, xs, ms, roi))(model)
            runners[name] = (lambda f: lambda sup, q, s, z: run_learned(f, scfg.mode, sup, q.image, z, scfg.chunks,
                                                                        True, device))(fit)
        else:
            fit = (lambda m: lambda xs, ms: fit_maml(m, scfg, xs, ms, cfg.seed))(model)
            runners[name] = (lambda f: lambda sup, q, s, z: run_learned(f, scfg.mode, sup, q.image, z, 1,
                                                                        False, device))(fit)
    if "finetune" in scfg.baselines and scfg.method != "propagate":  # no segmentation network to fine-tune
        trained = load_weights(build_model(cfg), run_dir / "model.safetensors").to(device)
        if scfg.method == "proto":
            backbone, div, head = trained.backbone, trained.divisor, True
        else:  # the MAML U-Net already has a 2-channel output: fine-tune it whole
            backbone, div, head = trained, backbone_divisor(scfg), False
        fit = lambda xs, ms: fit_finetune(backbone, div, scfg, xs, ms, cfg.seed, head=head)  # noqa: E731
        runners["finetune"] = lambda sup, q, s, z: run_learned(fit, scfg.mode, sup, q.image, z, 1, False, device)
    if "atlas" in scfg.baselines:
        from pipeline.segmentation.atlas import atlas_segment

        def atlas(sup: list[tuple[np.ndarray, np.ndarray]], q: Case, s: str, z: tuple[int, int] | None,
                  affines: list[np.ndarray] | None = None) -> np.ndarray:
            vols = [(Volume(img, aff), Volume(msk.astype(np.uint8), aff)) for (img, msk), aff in
                    zip(sup, affines or [q.affine] * len(sup), strict=True)]
            mask, _ = atlas_segment(vols, Volume(q.image, q.affine), seed=cfg.seed)
            return _in_range(mask, z)  # same slice-range protocol as the 2D learned methods

        runners["atlas"] = atlas
    return runners


def propagation_runners(cfg: Config, run_dir: Path) -> dict[str, Callable[..., np.ndarray]]:
    """`propagate` (the trained registration network) and `untrained` (its initial weights; with instance steps,
    what optimising each pair's field alone achieves), both under the same slice-range protocol as the atlas."""
    from pipeline.segmentation.propagate import load_net, propagate

    runners: dict[str, Callable[..., np.ndarray]] = {}
    for name, weights in (("propagate", "model.safetensors"), ("untrained", "untrained.safetensors")):
        net, grid = load_net(cfg, run_dir, weights)

        def run(sup: list[tuple[np.ndarray, np.ndarray]], q: Case, s: str, z: tuple[int, int] | None,
                net: torch.nn.Module = net, grid: tuple[int, ...] = grid) -> np.ndarray:
            return _in_range(propagate(net, cfg.registration, sup, q.image, grid, cfg.segmentation.fusion == "local"),
                             z)

        runners[name] = run
    return runners


def _in_range(mask: np.ndarray, z: tuple[int, int] | None) -> np.ndarray:
    """`mask` with the axial slices outside `z` (first, last) cleared; as it is when `z` is None."""
    if z is not None:
        keep = np.zeros(mask.shape[2], bool)
        keep[z[0]:z[1] + 1] = True
        mask = mask & keep[None, None, :]
    return mask


# --- the episodes --------------------------------------------------------------------------------------
def evaluation_episodes(cfg: Config, run_dir: Path, cases: list[Case], episodes_path: Path,
                        episodes_file: Path | None = None) -> list[dict[str, Any]]:
    """The episodes to score: `episodes_file` (checked, then copied to `episodes_path`), else `episodes_path` when
    it exists, else a fresh seeded set (what `python -m pipeline episodes` writes for the run's config) saved there.

    Raises:
        InputError: the file (named) holds another task's episodes, a structure the run does not hold out, a case
            outside the run's held-out patients, or other K / Q than the config; it is then not copied.
    """
    split_seed = load_run_config(run_dir).seed  # the run's patient split, even under `evaluate --set seed=N`
    if episodes_file is None and not episodes_path.exists():
        episodes = fixed_episodes(cfg, "test", cfg.episodes.eval_episodes, cases, split_seed=split_seed)
        write_json(episodes, episodes_path)
        return episodes
    source = Path(episodes_file if episodes_file is not None else episodes_path)
    episodes = load_episode_set(source, "segmentation")
    check_episodes(episodes, cfg, cases, split_seed, source)
    if source.resolve() != episodes_path.resolve():
        save_episode_set(episodes, episodes_path)
    return episodes


def check_episodes(episodes: list[dict[str, Any]], cfg: Config, cases: list[Case], split_seed: int,
                   path: Path) -> None:
    """Check episode records against the run: held-out structure, held-out cases that contain it, K support and
    1..Q query cases from disjoint patients.

    Raises:
        InputError: naming `path`, the episode and what is wrong.
    """
    held_out = split_structures(cases, cfg.segmentation.held_out)["test"]
    test_ids = {c.case_id for c in split_patients(cases, cfg.segmentation.test_patients, split_seed)[1]}
    by_id = {c.case_id: c for c in cases}
    shots, queries = cfg.episodes.shots, cfg.episodes.queries
    for n, ep in enumerate(episodes):
        s, support, query = ep.get("structure"), role_ids(ep, "support"), role_ids(ep, "query")
        if s not in held_out:
            raise InputError(path, f"episode {n}: structure {s!r} is not held out by this run (held out: {held_out})")
        if len(support) != shots or not 1 <= len(query) <= queries:
            raise InputError(path, f"episode {n}: {len(support)} support and {len(query)} query cases, but the "
                             f"config asks for {shots} and 1 to {queries}; regenerate the file with matching shots")
        for case_id in support + query:
            if case_id not in test_ids:
                where = "a training case of this run" if case_id in by_id else "not in this run's data"
                raise InputError(path, f"episode {n}: case {case_id!r} is {where}, not a held-out case")
            if s not in by_id[case_id].structures():
                raise InputError(path, f"episode {n}: case {case_id!r} has no {s}")
        if {by_id[c].patient_key for c in support} & {by_id[c].patient_key for c in query}:
            raise InputError(path, f"episode {n}: a patient is on both the support and the query side")


# --- evaluate -----------------------------------------------------------------------------------------
def evaluate(run_dir: Path, out: Path | None = None, episodes_file: Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Score every method on the fixed held-out-structure episodes; writes the report, box plot and overlays.

    With `episodes_file` (from `python -m pipeline episodes`), exactly those episodes are scored (checked before
    anything is written, then copied into the run as `episodes.json`). `overrides` (`--set shots=5`) evaluate the
    same weights another way, into their own files (`evaluation_files`).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    episodes_path, out, suffix = evaluation_files(run_dir, overrides, out, cfg.task)
    set_threads(cfg)
    cases = load_cases(cfg)
    episodes = evaluation_episodes(cfg, run_dir, cases, episodes_path, episodes_file)
    runners = method_runners(cfg, run_dir)
    overlays = _Overlays(cfg.segmentation.overlays, out.parent, suffix)
    rows, seconds = score_episodes(cfg, episodes, {c.case_id: c for c in cases}, runners, overlays)
    blocks = {n: _block(rows[n], seconds[n]) for n in runners}
    per_structure_dice = {n: _dice_by_structure(b["per_episode"]) for n, b in blocks.items()}  # for the box plot
    report = {**_report(cfg, episodes, blocks), "evaluation_seconds": time.perf_counter() - started}
    write_json(report, out)
    plot_dice_boxes(per_structure_dice, out.with_name(f"dice{suffix}.png"))
    write_page(run_dir, out, suffix=suffix)
    return report


Row = tuple[int, str, float, float]  # one query: episode index, structure, Dice, HD95


def score_episodes(cfg: Config, episodes: list[dict[str, Any]], by_id: dict[str, Case],
                   runners: dict[str, Callable[..., np.ndarray]],
                   overlays: _Overlays) -> tuple[dict[str, list[Row]], dict[str, list[float]]]:
    """Every method on every query of every episode: per method, one `Row` and the seconds taken per query."""
    mode = cfg.segmentation.mode
    rows: dict[str, list[Row]] = {n: [] for n in runners}
    seconds: dict[str, list[float]] = {n: [] for n in runners}
    for i, ep in enumerate(progress(episodes, desc="evaluating", unit="episode")):
        s = ep["structure"]
        sup_cases = [by_id[c] for c in role_ids(ep, "support")]
        supports = [(c.image, c.mask(s)) for c in sup_cases]
        for qid in role_ids(ep, "query"):
            q = by_id[qid]
            truth = q.mask(s)
            ks = foreground_slices(truth)
            zrange = (int(ks[0]), int(ks[-1])) if mode == "2d" else None
            for name, run in runners.items():
                t0 = time.perf_counter()
                pred = (run(supports, q, s, zrange, [c.affine for c in sup_cases]) if name == "atlas"
                        else run(supports, q, s, zrange))
                seconds[name].append(time.perf_counter() - t0)
                rows[name].append((i, s, *dice_hd95(pred, truth, _spacing(q))))
                if name == cfg.segmentation.method:
                    overlays.add(i, s, supports[0], q.image, truth, pred)
    return rows, seconds


class _Overlays:
    """Writes `overlay_<structure>.png` for the first episode of each structure, at most `limit` of them."""

    def __init__(self, limit: int, folder: Path, suffix: str) -> None:
        self.limit, self.folder, self.suffix, self.done = limit, folder, suffix, set()

    def add(self, i: int, s: str, support: tuple[np.ndarray, np.ndarray], query: np.ndarray, truth: np.ndarray,
            pred: np.ndarray) -> None:
        if s in self.done or len(self.done) >= self.limit:
            return
        self.done.add(s)
        k, ks = int(np.argmax(truth.sum((0, 1)))), int(np.argmax(support[1].sum((0, 1))))
        plot_overlay(support[0][:, :, ks], support[1][:, :, ks], query[:, :, k], truth[:, :, k], pred[:, :, k],
                     f"{s}: episode {i}, query slice {k}", self.folder / f"overlay_{s}{self.suffix}.png")


def _report(cfg: Config, episodes: list[dict[str, Any]], blocks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report: settings, the method's block at the top level, `untrained`, `baseline_<name>` and `paired`."""
    scfg = cfg.segmentation
    blocks = dict(blocks)
    main = blocks.pop(scfg.method)
    report = {"task": "segmentation", "method": scfg.method, "mode": scfg.mode, "supervision": scfg.supervision,
              "episodes": len(episodes), "shots": cfg.episodes.shots, "queries": cfg.episodes.queries,
              "structures": sorted({e["structure"] for e in episodes}), "empty_mask_policy": EMPTY_MASK_POLICY,
              **main, "untrained": blocks.pop("untrained"), **{f"baseline_{n}": b for n, b in blocks.items()}}
    report["paired"] = paired(report)
    return report


def _dice_by_structure(per_episode: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per structure, one Dice per episode (mean over that episode's queries), from a block's `per_episode`."""
    out: dict[str, list[float]] = {}
    for e in per_episode:
        out.setdefault(e["structure"], []).append(e["dice"])
    return out


def _block(rows: list[Row], seconds: list[float]) -> dict[str, Any]:
    """`metrics` and `per_structure` (Dice, HD95: mean and 95% CI over episodes), `per_episode` (an episode's Dice
    and HD95 are the means over its queries) and seconds per query."""
    queries: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i, s, d, h in rows:
        queries.setdefault((s, i), []).append((d, h))
    # structure by structure, episodes in order: the order the overall mean has always been summed in
    episodes = [{"episode": i, "structure": s, "dice": float(np.mean([q[0] for q in v])),
                 "hd95": float(np.mean([q[1] for q in v]))} for (s, i), v in sorted(queries.items())]
    items = [{**e, "per_structure": {e["structure"]: e}} for e in episodes]
    return {**metric_block(items, ("dice", "hd95")), "per_episode": sorted(episodes, key=lambda e: e["episode"]),
            "seconds_per_query": float(np.mean(seconds)) if seconds else 0.0}


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """The method minus each baseline (and the untrained weights), episode by episode: Dice difference, mean ± 95% CI
    (`paired_differences`). The episodes row of `episodes.json` with the same index names the structure and cases
    (by id) of each `per_episode` entry."""
    def dice(block: dict[str, Any]) -> list[float]:
        return [e["dice"] for e in block["per_episode"]]

    return paired_differences(dice(report), {key: dice(report[key]) for key in report
                                             if key == "untrained" or key.startswith("baseline_")})


def summary_table(report: dict[str, Any]) -> str:
    """Text table: one row per method (Dice and HD95 with 95% CIs, seconds per query), then per structure and the
    paired differences."""
    blocks = {report["method"]: report, "untrained": report["untrained"],
              **{k.removeprefix("baseline_"): v for k, v in report.items() if k.startswith("baseline_")}}
    rows = [[name, ci_text(b["metrics"]["dice"]), ci_text(b["metrics"]["hd95"], digits=1),
             f"{b['seconds_per_query']:.2f}"] for name, b in blocks.items()]
    notes = [f"  {report['method']} {s}: Dice {ci_text(m['dice'])}" for s, m in report["per_structure"].items()]
    notes += paired_lines(report, report["method"], {k: k.removeprefix("baseline_") for k in report.get("paired", {})})
    how = ("label propagation, registration trained on images only" if report["method"] == "propagate" else
           f"{report['supervision']}-supervised {report['method']}")
    return text_table(f"{report['shots']}-shot {report['mode']} segmentation of {report['structures']}, "
                      f"{report['episodes']} episodes ({how}); mean [95% CI]",
                      ["method", "Dice", "HD95 mm", "s/query"], rows, notes)
