"""Episodes shared by every task kind: fixed episode files (JSON) and the seeded stream of training episodes.

Fixed evaluation episode sets are JSON lists of records (`save_episode_set`, `load_episode_set`), so every method
is evaluated on exactly the same cases (paired comparisons). Training episodes stream from an `EpisodeStream`
subclass through a `DataLoader` (`episode_loader`); episode `i` depends only on the seed and `i`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datasets.volume import InputError, atomic_path

# Evaluation episodes get their own seed stream, so changing the training schedule never changes them.
EVAL_SEED_OFFSET = 1_000_003


def save_episode_set(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Write an episode file (a JSON list of episode records); all-or-nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(list(records), indent=1))


def load_episode_set(path: Path) -> list[dict[str, Any]]:
    """Read and check an episode file written by `save_episode_set` (any task)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read episode file: {err}") from None
    if not isinstance(records, list) or not records:
        raise InputError(path, "an episode file is a non-empty JSON list of episodes")
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or "task" not in rec or not isinstance(rec.get("cases"), list):
            raise InputError(path, f"episode {n} lacks 'task' or a 'cases' list")
        for case in rec["cases"]:
            if not isinstance(case, dict) or case.get("role") not in ("support", "query") or "case_id" not in case:
                raise InputError(path, f"episode {n}: each case needs role support|query and a case_id")
    return records


# --- streaming training episodes ---------------------------------------------------------------------------------
class EpisodeStream(IterableDataset):
    """Episodes `make(i)` for `i = start, start + 1, ...` (up to `length`, exclusive; None: endless).

    Subclasses define `make(i)` as a pure function of `i` (seed their randomness from `i`). Worker `w` of `W`
    makes episodes `w, w + W, ...` and the DataLoader interleaves workers round-robin, so the stream is the same
    for any number of workers, and resuming at `start` skips episodes without drawing them.
    """

    def __init__(self, length: int | None = None, start: int = 0) -> None:
        super().__init__()
        self.length, self.start = length, start

    def make(self, i: int) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        i, step = (info.id, info.num_workers) if info is not None else (0, 1)
        i += self.start
        while self.length is None or i < self.length:
            yield self.make(i)
            i += step


def episode_loader(dataset: EpisodeStream, workers: int = 0, prefetch: int = 2) -> DataLoader:
    """A DataLoader over an `EpisodeStream`: one episode per step, `workers` processes `prefetch` episodes ahead.

    With `workers: 0` episodes are made in the training process; that is fastest when an episode is a cheap
    gather of cached tensors (worker IPC costs more than it saves, benchmarks/README.md).
    """
    extra = {"prefetch_factor": prefetch, "persistent_workers": True} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, **extra)


