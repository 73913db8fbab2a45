"""Writing results: JSON reports and PNG plots, all written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


# --- summary tables -------------------------------------------------------------------------------------------
def ci_text(m: dict[str, Any], digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    """`mean [low, high]` of a `mean_ci95` mapping, each times `scale`; `signed` writes `+` on positive numbers."""
    spec = f"{'+' if signed else ''}.{digits}f"
    low, high = m["ci95"]
    return f"{m['mean'] * scale:{spec}} [{low * scale:{spec}}, {high * scale:{spec}}]"


def text_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    """A plain-text table: `title`, then the header and the rows in left-aligned columns, then `notes` lines."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([title, line(header), *(line(r) for r in rows), *notes])


def paired_lines(report: dict[str, Any], ours: str, names: dict[str, str], label: str = "Dice") -> list[str]:
    """One line per entry of `report["paired"]`: `paired Dice, OURS minus NAME: +mean [+low, +high]`.

    `names` maps a `paired` key (e.g. `baseline_atlas`) to the name to print (default: the key).
    """
    metric = label.lower()
    return [f"  paired {label}, {ours} minus {names.get(key, key)}: {ci_text(diff[metric], signed=True)}"
            for key, diff in report.get("paired", {}).items()]


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    """Training loss and (classification) episode accuracy against iteration."""
    fig, axes = plt.subplots(1, 2 if "accuracy" in curves else 1, figsize=(9, 3.5), squeeze=False)
    axes[0, 0].plot(curves["iteration"], curves["loss"])
    axes[0, 0].set(xlabel="iteration", ylabel="loss", title="meta-training loss")
    if "accuracy" in curves:
        axes[0, 1].plot(curves["iteration"], curves["accuracy"])
        axes[0, 1].set(xlabel="iteration", ylabel="query accuracy", title="training-episode accuracy", ylim=(0, 1))
    save_figure(fig, path)


def plot_accuracy(per_episode: dict[str, list[float]], chance: float, path: Path) -> None:
    """Distribution of per-episode accuracy for each model variant, with chance marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(per_episode)
    ax.boxplot([per_episode[n] for n in names], tick_labels=names, showmeans=True)
    ax.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
    ax.set(ylabel="episode accuracy", ylim=(0, 1.02), title="novel-class accuracy over evaluation episodes")
    ax.legend(loc="lower right")
    save_figure(fig, path)


# --- segmentation ------------------------------------------------------------------------------------
def plot_dice_boxes(per_method: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Box plot of per-episode Dice: one group per structure, one box per method."""
    import numpy as np

    methods = list(per_method)
    structures = sorted({s for m in per_method.values() for s in m})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(structures) * max(1, len(methods)) / 2), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        pos = np.arange(len(structures)) + (i - (len(methods) - 1) / 2) * width
        data = [per_method[method].get(s, []) or [np.nan] for s in structures]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showmeans=True)
        for box in bp["boxes"]:
            box.set_facecolor(f"C{i}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{i}", linewidth=6, alpha=0.6, label=method)
    ax.set_xticks(range(len(structures)), structures, rotation=20)
    ax.set(ylabel="Dice per episode", ylim=(0, 1.02), title="held-out structures over evaluation episodes")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_overlay(support: Any, support_mask: Any, query: Any, truth: Any, pred: Any, title: str,
                 path: Path) -> None:
    """Four panels on one axial slice each: support + mask, query, query + prediction, query + ground truth.

    Arrays are 2D `(I, J)` slices (RAS: I to the right, J anterior), shown with anterior up.
    """
    import numpy as np

    def show(ax: Any, img: Any, mask: Any, name: str, colour: str) -> None:
        ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=1)
        if mask is not None and np.any(mask):
            ax.contour(np.rot90(mask.astype(float)), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(name, fontsize=9)
        ax.axis("off")

    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
    show(axes[0], support, support_mask, "support + mask", "yellow")
    show(axes[1], query, None, "query", "yellow")
    show(axes[2], query, pred, "prediction", "red")
    show(axes[3], query, truth, "ground truth", "lime")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=90)


# --- classification ----------------------------------------------------------------------------------
def plot_confusion(matrix: Any, classes: list[str], path: Path, title: str = "novel-class confusion") -> None:
    """Row-normalised confusion matrix (rows: true class) with the raw counts written in each cell."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(3.5, 0.7 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_figure(fig, path)
