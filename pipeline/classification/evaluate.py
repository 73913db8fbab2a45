"""Evaluation on the novel classes over a fixed, seeded set of episodes, trained vs untrained."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classification.data import Items, open_source
from pipeline.classification.episodes import Episode, evaluation_episodes, split_groups
from pipeline.classification.train import NO_GAIN_ADVICE, build_model, episode_batch
from pipeline.common.config import Config
from pipeline.common.metrics import (
    BOUNDS,
    balanced_accuracy,
    confusion_matrix,
    macro_auc,
    mean_ci95,
    paired_differences,
)
from pipeline.common.page import write_page
from pipeline.common.progress import progress
from pipeline.common.report import ci_text, paired_lines, plot_accuracy, plot_confusion, text_table, write_json
from pipeline.common.run import evaluation_files, load_run_config, load_weights, pick_device, read_split, set_threads

log = logging.getLogger(__name__)


@torch.no_grad()
def episode_predictions(model: torch.nn.Module, items: Items, episodes: list[Episode], shots: int, queries: int,
                        device: torch.device, desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode: query class probabilities `(N*Q, N)` (softmax of the logits) and true local labels `(N*Q,)`.

    Gradient-based methods adapt inside `model(...)` with their own no-outer-graph inference path.
    """
    model.eval()
    out = []
    for ep in progress(episodes, desc=desc, unit="episode", leave=False):
        sx, sy, qx, qy = episode_batch(items, ep, shots, queries, device)
        logits = model(sx, sy, qx, len(ep.classes))
        out.append((torch.softmax(logits.float(), -1).cpu().numpy(), qy.cpu().numpy()))
    return out


def episode_metrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC per episode, each as mean and 95% CI."""
    per: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "auc": []}
    for probs, y in pairs:
        pred = probs.argmax(-1)
        per["accuracy"].append(float((pred == y).mean()))
        per["balanced_accuracy"].append(balanced_accuracy(pred, y, probs.shape[1]))
        per["auc"].append(macro_auc(probs, y))
    return {name: mean_ci95(values, bounds=(0.0, 1.0)) for name, values in per.items()}


def evaluate(run_dir: Path, out: Path | None = None, episodes_file: Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a run directory's trained and untrained weights; writes `report.json`, `accuracy.png`,
    `confusion.png` and the page `report.html` (`pipeline.common.page`).

    With `episodes_file` (from `python -m pipeline episodes`), exactly those episodes are used (copied into the
    run as `episodes.json`), so different methods are compared on the same cases. `overrides` (`--set shots=5`)
    evaluate the same weights another way, into their own files (`evaluation_files`).
    """
    started = time.perf_counter()
    cfg = load_run_config(run_dir, overrides)
    set_threads(cfg)
    episodes_path, out, suffix = evaluation_files(run_dir, overrides, out, cfg.task)
    split = read_split(run_dir)
    device = pick_device(cfg.train.device)
    ep_cfg = cfg.episodes
    if not cfg.data.manifest and (run_dir / "manifest.csv").exists():
        # Re-use the manifest written at training time, so evaluation sees exactly the indexed files.
        cfg.data.manifest = str(run_dir / "manifest.csv")
    items = open_source(cfg).items(split["novel"], split_groups(split, "novel"))
    episodes = evaluation_episodes(cfg, split, items.labels, items.groups, items.ids, episodes_path, episodes_file)

    model = build_model(cfg, n_base=len(split["base"])).to(device)
    preds = {
        name: episode_predictions(load_weights(model, run_dir / weights), items, episodes, ep_cfg.shots,
                                  ep_cfg.queries, device, f"evaluating {name}")
        for name, weights in [("untrained", "untrained.safetensors"), ("trained", "model.safetensors")]
    }
    if cfg.method.name != "finetune":  # model holds the trained weights now: its encoder under a new linear head
        preds["finetune"] = episode_predictions(finetune_baseline(model, cfg), items, episodes, ep_cfg.shots,
                                                ep_cfg.queries, device, "evaluating finetune")
    per_episode = {name: [float((p.argmax(-1) == y).mean()) for p, y in pairs] for name, pairs in preds.items()}
    chance = 1.0 / ep_cfg.ways
    names = sorted({c for ep in episodes for c in ep.classes})
    confusion = _confusion(episodes, preds["trained"], names)
    report = {
        "task": cfg.task,
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "episodes": len(episodes),
        "ways": ep_cfg.ways,
        "shots": ep_cfg.shots,
        "queries": ep_cfg.queries,
        "chance": chance,
        "classes": split["novel"],
        "metrics": episode_metrics(preds["trained"]),
        "untrained": {"metrics": episode_metrics(preds["untrained"])},
        **({"baseline_finetune": {"metrics": episode_metrics(preds["finetune"])}} if "finetune" in preds else {}),
        "paired": paired_differences(per_episode["trained"], {("untrained" if n == "untrained" else f"baseline_{n}"): v
                                                              for n, v in per_episode.items() if n != "trained"},
                                     metric="accuracy"),
        "per_class": _per_class(episodes, preds["trained"]),
        "confusion": {"classes": names, "matrix": confusion.tolist()},
        "no_better_than_untrained": no_better_than_untrained(per_episode["trained"], per_episode["untrained"]),
        # query accuracy of each episode, indexed like episodes.json: runs on the same episode set pair up
        "per_episode": {"accuracy": per_episode},
        "evaluation_seconds": time.perf_counter() - started,
    }
    if report["no_better_than_untrained"]:
        log.warning("WARNING: the trained model is no better than untrained on these novel-class episodes (the "
                    "paired accuracy interval reaches 0): %s", NO_GAIN_ADVICE)
    write_json(report, out)
    write_json(report["confusion"], out.with_name(f"confusion{suffix}.json"))
    plot_confusion(confusion, names, out.with_name(f"confusion{suffix}.png"))
    plot_accuracy(per_episode, chance, out.with_name(f"accuracy{suffix}.png"))
    write_page(run_dir, out, suffix=suffix)
    return report


def no_better_than_untrained(trained: Sequence[float], untrained: Sequence[float]) -> bool:
    """Whether meta-training shows no gain: the 95% CI of the paired per-episode accuracy differences (trained
    minus untrained, same episodes, as in `report["paired"]["untrained"]`) has a lower bound <= 0.

    Args:
        trained, untrained: per-episode query accuracies `(E,)`, episode by episode.
    """
    diff = paired_differences(trained, {"untrained": untrained}, metric="accuracy")["untrained"]["accuracy"]
    return bool(diff["ci95"][0] <= 0)


def finetune_baseline(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The method's trained encoder under a new linear head fitted on each support set (Chen et al. 2019's
    Baseline): what the meta-training bought over plain transfer of the same encoder."""
    from pipeline.classification.methods.finetune import FineTune

    encoder = model.encoder if hasattr(model, "encoder") else model.net[0]  # MAML family: Sequential(encoder, head)
    return FineTune(encoder, 1, steps=cfg.method.head_steps, lr=cfg.method.head_lr).eval()


def _confusion(episodes: list[Episode], preds: list[tuple[np.ndarray, np.ndarray]], names: list[str]) -> np.ndarray:
    """Confusion counts over all episodes in terms of the global class names (rows true, columns predicted)."""
    index = {n: i for i, n in enumerate(names)}
    total = np.zeros((len(names), len(names)), dtype=np.int64)
    for ep, (probs, y) in zip(episodes, preds, strict=True):
        to_global = np.asarray([index[c] for c in ep.classes])
        total += confusion_matrix(to_global[y], to_global[probs.argmax(-1)], len(names))
    return total


def _per_class(episodes: list[Episode], preds: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per novel class: query accuracy (recall) over the episodes that include it, mean and 95% CI."""
    per: dict[str, list[float]] = {}
    for ep, (probs, y) in zip(episodes, preds, strict=True):
        p = probs.argmax(-1)
        for k, name in enumerate(ep.classes):
            per.setdefault(name, []).append(float((p[y == k] == k).mean()))
    return {name: {"recall": mean_ci95(v, BOUNDS["accuracy"])} for name, v in sorted(per.items())}


def summary_table(report: dict[str, Any]) -> str:
    """A short text table of a classification report: accuracy and balanced accuracy (mean [95% CI]), macro-AUC."""
    blocks = [("untrained", report["untrained"]["metrics"]), ("trained", report["metrics"])]
    if "baseline_finetune" in report:
        blocks.append(("finetune", report["baseline_finetune"]["metrics"]))
    rows = [[name, *(ci_text(m[k]) for k in ("accuracy", "balanced_accuracy")), f"{m['auc']['mean']:.3f}"]
            for name, m in blocks]
    notes = paired_lines(report, "trained", {"baseline_finetune": "finetune"}, label="accuracy")
    return text_table(f"{report['ways']}-way {report['shots']}-shot on novel classes {report['classes']}, "
                      f"{report['episodes']} episodes (chance {report['chance']:.3f}); mean [95% CI]",
                      ["model", "accuracy", "balanced acc.", "macro-AUC"], rows, notes)
