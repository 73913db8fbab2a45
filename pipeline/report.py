"""Writing results: JSON reports and PNG plots, all written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from datasets.volume import atomic_path  # noqa: E402


def write_json(obj: Any, path: Path) -> None:
    """Pretty JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    """Training loss and episode accuracy against iteration."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(curves["iteration"], curves["loss"])
    ax1.set(xlabel="iteration", ylabel="query loss", title="meta-training loss")
    ax2.plot(curves["iteration"], curves["accuracy"])
    ax2.set(xlabel="iteration", ylabel="query accuracy", title="training-episode accuracy", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_accuracy(per_episode: dict[str, list[float]], chance: float, path: Path) -> None:
    """Distribution of per-episode accuracy for each model variant, with chance marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(per_episode)
    ax.boxplot([per_episode[n] for n in names], tick_labels=names, showmeans=True)
    ax.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
    ax.set(ylabel="episode accuracy", ylim=(0, 1.02), title="novel-class accuracy over evaluation episodes")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
