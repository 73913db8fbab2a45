"""The classification task kind's protocol (see `pipeline/__main__.py`): train, evaluate, episodes, adapt, predict."""

from __future__ import annotations

from pathlib import Path

from pipeline.classification.adapt import adapt as _adapt
from pipeline.classification.adapt import format_predictions, write_predictions
from pipeline.classification.adapt import predict as _predict
from pipeline.classification.episodes import classification_episodes as fixed_episodes
from pipeline.classification.evaluate import evaluate, summary_table
from pipeline.classification.train import train

__all__ = ["adapt", "evaluate", "fixed_episodes", "predict", "summary_table", "train"]


def adapt(run: Path, support: Path, out: Path, structure: str | None = None) -> str:
    """Adapt to the classes of a support CSV or class folders; returns the line the CLI prints."""
    summary = _adapt(run, support, out)
    return f"adapted {summary['method']} to {summary['support_per_class']} -> {out}"


def predict(adapted: Path, inputs: list[Path], out: Path, centre: list[float] | None = None,
            queries: Path | None = None, whole_volume: bool = False) -> str:
    """Per-class probabilities of each input (and of each `queries` CSV row): a text table, and
    `OUT/predictions.csv` + `OUT/predictions.json`."""
    results = _predict(adapted, inputs, centre, queries, whole_volume)
    table, _ = write_predictions(results, out)
    return f"{format_predictions(results)}\n-> {table}"


