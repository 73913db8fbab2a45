"""Class splits and N-way K-shot Q-query episodes with patients kept apart.

An item is one labelled example (a lesion crop) with a class name and a group (the pseudonymised patient key).
Rules enforced here, and tested:
- novel classes never appear in training episodes (the sampler only sees the classes it is given);
- no patient has items on both the support and the query side of one episode;
- the same seed gives the same episodes.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.volume import FewscanError, atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Episode:
    """One few-shot task: item indices, class-major (`shots` per class in support, `queries` in query)."""

    classes: tuple[str, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]

    def labels(self, shots: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode-local labels `0..N-1`: arrays of shape `(N*shots,)` and `(N*queries,)`."""
        n = len(self.classes)
        return np.repeat(np.arange(n), shots), np.repeat(np.arange(n), queries)


def split_classes(classes: Sequence[str], novel: Sequence[str], validation: Sequence[str]) -> dict[str, list[str]]:
    """Partition class names into base / validation / novel; unknown holdout names are an error."""
    known = set(classes)
    missing = [c for c in [*novel, *validation] if c not in known]
    if missing:
        raise FewscanError(f"split names classes not in the data: {missing} (classes: {sorted(known)})")
    if set(novel) & set(validation):
        raise FewscanError(f"classes both novel and validation: {sorted(set(novel) & set(validation))}")
    held = set(novel) | set(validation)
    return {
        "base": sorted(c for c in known if c not in held),
        "validation": sorted(validation),
        "novel": sorted(novel),
    }


class EpisodeSampler:
    """Draws episodes from a fixed set of classes, keeping each episode's support and query patients apart.

    Args:
        labels: class name of every item, length M.
        groups: patient key of every item, length M.
        classes: the classes this sampler may use (e.g. the base classes for training).
        ways, shots, queries: N, K, Q.
        seed: seeds the sampler's own generator.
    """

    def __init__(
        self,
        labels: Sequence[str],
        groups: Sequence[str],
        classes: Sequence[str],
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
    ) -> None:
        self.groups = list(groups)
        self.shots, self.queries = shots, queries
        by_class: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            if label in set(classes):
                by_class[label].append(i)
        # A class needs K support and Q query items from different patients: check that up front.
        self.by_class: dict[str, list[int]] = {}
        for name in sorted(classes):
            n_patients = len({self.groups[i] for i in by_class.get(name, [])})
            if n_patients < 2 or len(by_class.get(name, [])) < shots + queries:
                log.warning("class %r excluded: %d items from %d patients (< K+Q=%d)",
                            name, len(by_class.get(name, [])), n_patients, shots + queries)
                continue
            self.by_class[name] = by_class[name]
        if len(self.by_class) < ways:
            raise FewscanError(
                f"{ways}-way episodes need {ways} classes with >= {shots + queries} items from >= 2 patients; "
                f"usable: {sorted(self.by_class)}")
        self.ways = ways
        self.rng = np.random.default_rng(seed)

    def sample(self, max_tries: int = 100) -> Episode:
        """Draw one episode; retries when a patient split leaves a class short of queries."""
        for _ in range(max_tries):
            episode = self._try_sample()
            if episode is not None:
                return episode
        raise FewscanError("could not draw a patient-disjoint episode: too few patients per class")

    def _try_sample(self) -> Episode | None:
        names = list(self.by_class)
        classes = [names[i] for i in sorted(self.rng.choice(len(names), self.ways, replace=False))]
        # Support first, then queries only from patients not used on the support side.
        support: list[int] = []
        for name in classes:
            support += list(self.rng.choice(self.by_class[name], self.shots, replace=False))
        support_patients = {self.groups[i] for i in support}
        query: list[int] = []
        for name in classes:
            pool = [i for i in self.by_class[name] if self.groups[i] not in support_patients]
            if len(pool) < self.queries:
                return None
            query += list(self.rng.choice(pool, self.queries, replace=False))
        return Episode(tuple(classes), tuple(int(i) for i in support), tuple(int(i) for i in query))

    def fixed(self, n: int) -> list[Episode]:
        """`n` episodes from this sampler's current state (seed it freshly for a reproducible set)."""
        return [self.sample() for _ in range(n)]


def save_episodes(episodes: Sequence[Episode], path: Path, item_ids: Sequence[str] | None = None) -> None:
    """Write episodes as JSON (indices, and item ids when given, so the file is readable and checkable)."""
    rows = []
    for ep in episodes:
        row = asdict(ep)
        if item_ids is not None:
            row["support_ids"] = [item_ids[i] for i in ep.support]
            row["query_ids"] = [item_ids[i] for i in ep.query]
        rows.append(row)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=1))


def load_episodes(path: Path) -> list[Episode]:
    """Read episodes written by `save_episodes`."""
    return [Episode(tuple(r["classes"]), tuple(r["support"]), tuple(r["query"])) for r in json.loads(path.read_text())]
