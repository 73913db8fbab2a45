"""Evaluation on the novel classes over a fixed, seeded set of episodes, trained vs untrained."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Items, open_source
from pipeline.episodes import Episode, EpisodeSampler, load_episodes, save_episodes
from pipeline.metrics import mean_ci95
from pipeline.report import plot_accuracy, write_json
from pipeline.train import build_model, episode_batch, load_run_config, load_weights, pick_device, read_split

log = logging.getLogger(__name__)

# Evaluation episodes get their own seed stream, so changing the training schedule never changes them.
EVAL_SEED_OFFSET = 1_000_003


@torch.no_grad()
def episode_predictions(model: torch.nn.Module, items: Items, episodes: list[Episode], shots: int, queries: int,
                        device: torch.device, desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode: predicted and true episode-local query labels, each of shape `(N*Q,)`."""
    model.eval()
    out = []
    for ep in tqdm(episodes, desc=desc, unit="episode", leave=False):
        sx, sy, qx, qy = episode_batch(items, ep, shots, queries, device)
        logits = model(sx, sy, qx, len(ep.classes))
        out.append((logits.argmax(-1).cpu().numpy(), qy.cpu().numpy()))
    return out


def evaluate(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a run directory's trained and untrained weights; writes `report.json` and `accuracy.png`."""
    cfg = load_run_config(run_dir)
    split = read_split(run_dir)
    device = pick_device(cfg.train.device)
    ep_cfg = cfg.episodes
    if not cfg.data.manifest and (run_dir / "manifest.csv").exists():
        # Re-use the manifest written at training time, so evaluation sees exactly the indexed files.
        cfg.data.manifest = str(run_dir / "manifest.csv")
    items = open_source(cfg).items(split["novel"])

    episodes_path = run_dir / "episodes.json"
    if episodes_path.exists():
        episodes = load_episodes(episodes_path)
    else:
        sampler = EpisodeSampler(items.labels, items.groups, split["novel"], ep_cfg.ways, ep_cfg.shots,
                                 ep_cfg.queries, seed=cfg.seed + EVAL_SEED_OFFSET)
        episodes = sampler.fixed(ep_cfg.eval_episodes)
        save_episodes(episodes, episodes_path, items.ids)

    model = build_model(cfg).to(device)
    preds = {
        name: episode_predictions(load_weights(model, run_dir / weights), items, episodes, ep_cfg.shots,
                                  ep_cfg.queries, device, f"evaluating {name}")
        for name, weights in [("untrained", "untrained.safetensors"), ("trained", "model.safetensors")]
    }
    per_episode = {name: [float((p == y).mean()) for p, y in pairs] for name, pairs in preds.items()}
    chance = 1.0 / ep_cfg.ways
    report = {
        "task": cfg.task,
        "method": cfg.method.name,
        "episodes": len(episodes),
        "ways": ep_cfg.ways,
        "shots": ep_cfg.shots,
        "queries": ep_cfg.queries,
        "chance": chance,
        "classes": split["novel"],
        "metrics": {"accuracy": mean_ci95(per_episode["trained"])},
        "untrained": {"metrics": {"accuracy": mean_ci95(per_episode["untrained"])}},
        "per_class": _per_class(episodes, preds["trained"]),
    }
    out = out or run_dir / "report.json"
    write_json(report, out)
    plot_accuracy(per_episode, chance, out.with_name("accuracy.png"))
    return report


def _per_class(episodes: list[Episode], preds: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per novel class: query accuracy (recall) over the episodes that include it, mean and 95% CI."""
    per: dict[str, list[float]] = {}
    for ep, (p, y) in zip(episodes, preds, strict=True):
        for k, name in enumerate(ep.classes):
            per.setdefault(name, []).append(float((p[y == k] == k).mean()))
    return {name: {"recall": mean_ci95(v)} for name, v in sorted(per.items())}


def summary_table(report: dict[str, Any]) -> str:
    """A short text table of a classification report."""
    def row(name: str, m: dict[str, Any]) -> str:
        lo, hi = m["ci95"]
        return f"  {name:<10} {m['mean']:.3f}  [{lo:.3f}, {hi:.3f}]"

    return "\n".join([
        f"{report['ways']}-way {report['shots']}-shot on novel classes {report['classes']}, "
        f"{report['episodes']} episodes (chance {report['chance']:.3f})",
        "  model      accuracy  95% CI",
        row("untrained", report["untrained"]["metrics"]["accuracy"]),
        row("trained", report["metrics"]["accuracy"]),
    ])


