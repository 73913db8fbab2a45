"""Per-episode metrics and their 95% confidence intervals over episodes (or registration pairs)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

# The range of each metric: a t-interval is clipped to it (seen unclipped: Dice [-0.41, 0.94], HD95 [-3.4, 26.5]).
BOUNDS: dict[str, tuple[float, float]] = {
    "dice": (0.0, 1.0), "accuracy": (0.0, 1.0), "folding": (0.0, 1.0), "hd95": (0.0, float("inf")),
    "log_jac_std": (0.0, float("inf")), "seconds": (0.0, float("inf")),
}
# Paired differences of a metric in [0, 1] lie in [-1, 1].
DIFFERENCE_BOUNDS: dict[str, tuple[float, float]] = {"dice": (-1.0, 1.0), "accuracy": (-1.0, 1.0)}


def mean_ci95(values: Sequence[float],
              bounds: tuple[float, float] | None = None) -> dict[str, float | list[float] | int]:
    """Mean with a two-sided 95% Student-t confidence interval over episodes.

    Returns:
        `{"mean", "ci95": [low, high], "std", "n"}`; for one value the interval collapses to the mean.
    """
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci95": [mean, mean], "std": 0.0, "n": len(x)}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    low, high = mean - half, mean + half
    if bounds is not None:  # a t-interval can leave a bounded metric's range (e.g. accuracy near 1)
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci95": [low, high], "std": float(x.std(ddof=1)), "n": len(x)}


def metric_block(items: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                 structure_metrics: Sequence[str] = ("dice", "hd95")) -> dict[str, Any]:
    """Mean and 95% CI over items (episodes or pairs) of each metric, overall and per structure.

    Args:
        items: one mapping per item: a float per name in `metrics`, and `per_structure`
            (`{structure: {metric: float}}`, the structures that item scores).
        metrics: the overall metrics; an item whose value is not finite (a pair without a labelled structure) is
            left out of that metric (NaN when no item has one).
        structure_metrics: the metrics of each structure, over the items that score it.

    Returns:
        `{"metrics": {metric: mean_ci95}, "per_structure": {structure: {metric: mean_ci95}}}`, structures sorted.
    """
    overall = {k: mean_ci95([float(it[k]) for it in items if np.isfinite(it[k])] or [float("nan")], BOUNDS.get(k))
               for k in metrics}
    names = sorted({name for it in items for name in it["per_structure"]})
    per = {name: {k: mean_ci95([it["per_structure"][name][k] for it in items if name in it["per_structure"]],
                               BOUNDS.get(k)) for k in structure_metrics} for name in names}
    return {"metrics": overall, "per_structure": per}


def paired_differences(ours: Sequence[float], others: Mapping[str, Sequence[float]],
                       metric: str = "dice") -> dict[str, dict[str, Any]]:
    """Ours minus each other method, item by item on the same episodes (or pairs): mean and 95% CI.

    Every method is scored on the same items, so the paired difference says whether ours is lower on the same
    items, which two overlapping unpaired intervals cannot.

    Returns:
        `{name: {metric: mean_ci95}}` for each name of `others`.

    Raises:
        ValueError: a method scored another number of items than ours.
    """
    a = np.asarray(ours, dtype=float)
    out = {}
    for name, theirs in others.items():
        b = np.asarray(theirs, dtype=float)
        if b.shape != a.shape:
            raise ValueError(f"paired difference with {name}: {len(b)} items against {len(a)}")
        out[name] = {metric: mean_ci95(list(a - b), DIFFERENCE_BOUNDS.get(metric))}
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max equals the label; logits `(Q, N)`, labels `(Q,)`."""
    return float((logits.argmax(-1) == labels).mean())


# --- segmentation ------------------------------------------------------------------------------------
# Empty-mask policy (MONAI's `ignore_empty` returns 0 rather than NaN in some versions, MONAI #7504, and calling
# `aggregate()` twice changes results, #4172): we never call `aggregate()`; each pair is scored by a fresh
# metric call with reduction "none", and the empty cases are decided here, explicitly:
# - truth empty and prediction empty: Dice 1, HD95 0 (nothing to find, nothing found);
# - exactly one of them empty: Dice 0, HD95 = the diagonal of the volume in mm (the worst possible distance),
#   so a method that misses a structure is penalised rather than silently skipped.
# Evaluation episodes only use queries that contain the structure, so the first case occurs only in `predict`.


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Dice and 95th-percentile Hausdorff distance (mm) of two binary masks of shape `(*S)` (2D or 3D).

    Uses `monai.metrics.DiceMetric` and `HausdorffDistanceMetric(percentile=95)` with the voxel `spacing`.
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() or not t.any():
        if not p.any() and not t.any():
            return 1.0, 0.0
        return 0.0, float(np.linalg.norm(np.asarray(p.shape) * np.asarray(spacing)))
    yp = torch.from_numpy(p[None, None].astype(np.float32))
    yt = torch.from_numpy(t[None, None].astype(np.float32))
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument on every call
        warnings.simplefilter("ignore", FutureWarning)
        dice = DiceMetric(include_background=True, reduction="none")(yp, yt)
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            yp, yt, spacing=[float(s) for s in spacing])
    return float(dice.item()), float(hd.item())


# --- classification ----------------------------------------------------------------------------------
def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present in `labels`; pred and labels `(Q,)` in `0..N-1`."""
    recalls = [float((pred[labels == k] == k).mean()) for k in range(n_classes) if (labels == k).any()]
    return float(np.mean(recalls))


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count half); NaN when one side is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest ROC AUC from probabilities `(Q, N)`, averaged over the classes present in `labels`."""
    aucs = [binary_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    return float(np.nanmean(aucs))


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts `(N, N)`: row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (true, pred), 1)
    return out
