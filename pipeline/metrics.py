"""Per-episode metrics and their 95% confidence intervals over episodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci95(values: Sequence[float]) -> dict[str, float | list[float] | int]:
    """Mean with a two-sided 95% Student-t confidence interval over episodes.

    Returns:
        `{"mean", "ci95": [low, high], "std", "n"}`; for one value the interval collapses to the mean.
    """
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci95": [mean, mean], "std": 0.0, "n": len(x)}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "std": float(x.std(ddof=1)), "n": len(x)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max equals the label; logits `(Q, N)`, labels `(Q,)`."""
    return float((logits.argmax(-1) == labels).mean())
