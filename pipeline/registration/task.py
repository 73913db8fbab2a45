"""The registration task kind's protocol (see `pipeline/__main__.py`): train, evaluate, episodes (pairs).

Registration adapts inside `evaluate` (on the run's adaptation pairs) and applies a run with the `register` verb,
so `adapt` and `predict` refuse with one line.
"""

from __future__ import annotations

from pathlib import Path

from datasets.volume import FewscanError
from pipeline.registration.episodes import fixed_pairs as fixed_episodes
from pipeline.registration.evaluate import evaluate, summary_table
from pipeline.registration.train import train

__all__ = ["adapt", "evaluate", "fixed_episodes", "predict", "summary_table", "train"]


def adapt(run: Path, support: Path, out: Path, structure: str | None = None) -> str:
    raise FewscanError(f"{run}: a registration run adapts during `evaluate` (registration.adapt_pairs); "
                       "use `register --checkpoint RUN` to apply it")


def predict(adapted: Path, inputs: list[Path], out: Path, centre: list[float] | None = None) -> str:
    raise FewscanError(f"{adapted}: registration has no `predict`; use `register --fixed F --moving M "
                       "--checkpoint RUN`")
