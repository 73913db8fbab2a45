"""Episodes shared by every task kind: fixed episode files (JSON) and the seeded stream of training episodes.

Fixed evaluation episode sets are JSON lists of records (`save_episode_set`, `load_episode_set`), so every method
is evaluated on exactly the same cases (paired comparisons). Training episodes stream from an `EpisodeStream`
subclass through a `DataLoader` (`episode_loader`); episode `i` depends only on the seed and `i`.
Every random draw of episodes takes its seed from `stream_seed`, the one rule shared by the three task kinds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datasets.volume import InputError, atomic_path

# Each stream of episodes has its own seed, so changing one (say, the training schedule or the number of
# validation episodes) never changes another. The offsets are the ones classification always used.
STREAM_OFFSETS = {"train": 0, "validation": 500_009, "evaluation": 1_000_003, "pretrain": 1_500_007}
# The roles of an episode record's cases, per task kind.
ROLES = {"classification": ("support", "query"), "segmentation": ("support", "query"),
         "registration": ("moving", "fixed")}


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one stream of episodes of a run seeded `seed`: `train`, `validation` or `evaluation`.

    Fixed episode sets (evaluation episodes, the `episodes` verb, validation episodes) seed a generator with it,
    `np.random.default_rng(stream_seed(seed, stream))`; streamed training episodes draw episode `i` from
    `default_rng([stream_seed(seed, "train"), i])`.
    """
    if stream not in STREAM_OFFSETS:
        raise ValueError(f"unknown episode stream {stream!r} (known: {sorted(STREAM_OFFSETS)})")
    return seed + STREAM_OFFSETS[stream]


def save_episode_set(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Write an episode file (a JSON list of episode records); all-or-nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(list(records), indent=1))


def record_kind(record: dict[str, Any]) -> str | None:
    """The task kind an episode record belongs to, from its shape (None: none of them).

    Classification records say `"task": "classification"`; segmentation records name a `structure` (older files
    have no `task` key); registration pairs have `moving` and `fixed` cases (their `task` is the anatomy).
    """
    roles = {c.get("role") for c in record["cases"] if isinstance(c, dict)}
    if roles and roles <= set(ROLES["registration"]):
        return "registration"
    if record.get("task") in ("classification", "segmentation"):
        return record["task"]
    return "segmentation" if "structure" in record else None


def load_episode_set(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Read and check an episode file written by `save_episode_set`; with `kind`, every record must be of it.

    Raises:
        InputError: unreadable JSON, not a non-empty list of records, a record without a `cases` list of
            `{role, case_id}` with the roles of its kind, or (with `kind`) a record of another task kind.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read episode file: {err}") from None
    if not isinstance(records, list) or not records:
        raise InputError(path, "an episode file is a non-empty JSON list of episodes")
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("cases"), list) or not rec["cases"]:
            raise InputError(path, f"episode {n} lacks 'task' or a 'cases' list")
        found = record_kind(rec)
        if found is None:
            raise InputError(path, f"episode {n} lacks 'task' (neither a classification, segmentation nor "
                             "registration episode)")
        if kind is not None and found != kind:
            raise InputError(path, f"episode {n} is a {found} episode, not {kind}: write the file with "
                             "`python -m pipeline episodes` and the run's config")
        for case in rec["cases"]:
            if not isinstance(case, dict) or case.get("role") not in ROLES[found] or "case_id" not in case:
                raise InputError(path, f"episode {n}: each case needs role {'|'.join(ROLES[found])} and a case_id")
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


