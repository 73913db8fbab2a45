"""Class splits and N-way K-shot Q-query episodes with patients kept apart.

An item is one labelled example (a lesion crop) with a class name and a group (the pseudonymised patient key).
Rules enforced here, and tested:
- novel classes never appear in training episodes (the sampler only sees the classes it is given);
- no patient has items on both the support and the query side of one episode;
- the same seed gives the same episodes;
- with a patient split, base / validation / novel classes draw from disjoint train / validation / test patients.

Fixed evaluation episode sets are JSON files (see `save_episode_set`), so every method is evaluated on exactly
the same cases (paired comparisons). Training episodes stream from `EpisodeDataset` through a `DataLoader`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.volume import FewscanError, InputError
from pipeline.common.config import Config
from pipeline.common.episodes import EpisodeStream, load_episode_set, save_episode_set, stream_seed
from pipeline.common.splits import split_patients

log = logging.getLogger(__name__)

# Which patients each class part draws from when a patient split is configured.
PATIENT_PART = {"base": "train", "validation": "validation", "novel": "test"}


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
        wanted = set(classes)
        for i, label in enumerate(labels):
            if label in wanted:
                by_class[label].append(i)
        # A class needs K support and Q query items from different patients. With K+Q patients any K-item support
        # leaves at least Q patients for the query, so draws never dead-end: check that up front.
        self.by_class: dict[str, list[int]] = {}
        for name in sorted(classes):
            n_patients = len({self.groups[i] for i in by_class.get(name, [])})
            if n_patients < shots + queries:
                log.warning("class %r excluded: %d items from %d patients (< K+Q=%d patients)",
                            name, len(by_class.get(name, [])), n_patients, shots + queries)
                continue
            self.by_class[name] = by_class[name]
        # Integer patient codes and index arrays per class: the query pools are then one vectorised mask each.
        codes = {g: k for k, g in enumerate(dict.fromkeys(self.groups))}
        self._group_code = np.array([codes[g] for g in self.groups], dtype=np.int64)
        self._class_index = {name: np.asarray(idx, dtype=np.int64) for name, idx in self.by_class.items()}
        if len(self.by_class) < ways:
            raise FewscanError(
                f"{ways}-way episodes need {ways} classes with items from >= K+Q={shots + queries} patients; "
                f"usable: {sorted(self.by_class)}")
        self.ways = ways
        self.rng = np.random.default_rng(seed)

    def sample(self, max_tries: int = 100, rng: np.random.Generator | None = None) -> Episode:
        """Draw one episode (from `rng`, else the sampler's own stream); retries when the patient split leaves
        a class short of queries."""
        rng = self.rng if rng is None else rng
        for _ in range(max_tries):
            episode = self._try_sample(rng)
            if episode is not None:
                return episode
        raise FewscanError("could not draw a patient-disjoint episode: too few patients per class")

    def _try_sample(self, rng: np.random.Generator) -> Episode | None:
        names = list(self.by_class)
        classes = [names[i] for i in sorted(rng.choice(len(names), self.ways, replace=False))]
        # Support first, then queries only from patients not used on the support side.
        support: list[int] = []
        for name in classes:
            support += list(rng.choice(self._class_index[name], self.shots, replace=False))
        support_patients = np.unique(self._group_code[support])
        query: list[int] = []
        for name in classes:
            idx = self._class_index[name]
            pool = idx[~np.isin(self._group_code[idx], support_patients)]
            if len(pool) < self.queries:
                return None
            query += list(rng.choice(pool, self.queries, replace=False))
        return Episode(tuple(classes), tuple(int(i) for i in support), tuple(int(i) for i in query))

    def fixed(self, n: int) -> list[Episode]:
        """`n` episodes from this sampler's current state (seed it freshly for a reproducible set)."""
        return [self.sample() for _ in range(n)]




def make_split(split_cfg: Any, classes: Sequence[str], groups: Sequence[str], seed: int) -> dict[str, Any]:
    """The run's split: class holdout (`base`/`validation`/`novel`) plus, when configured, `patients`
    (`train`/`validation`/`test` lists of patient keys). Written to `split.json` so evaluation reproduces it.

    Args:
        split_cfg: the `split` config section (`novel`, `validation`, `patients.validation`, `patients.test`).
        classes: all class names of the source.
        groups: patient keys of all labelled items.
        seed: run seed.
    """
    out: dict[str, Any] = split_classes(classes, split_cfg.novel, split_cfg.validation)
    fractions = split_cfg.patients
    if fractions.validation or fractions.test:
        out["patients"] = split_patients(groups, fractions.validation, fractions.test, seed)
        out["patient_fractions"] = {"validation": fractions.validation, "test": fractions.test, "seed": seed}
    return out


def split_groups(split: dict[str, Any], part: str) -> set[str] | None:
    """Patient keys that class part `part` (`base`/`validation`/`novel`) may use; None: no patient split.

    Validation classes fall back to the train patients when no validation patients were split off.
    """
    patients = split.get("patients")
    if not patients:
        return None
    name = PATIENT_PART[part]
    if name == "validation" and not patients.get("validation"):
        name = "train"
    return set(patients[name])


# --- fixed episode sets (JSON) ---------------------------------------------------------------------------------
def episode_records(episodes: Sequence[Episode], labels: Sequence[str], groups: Sequence[str], ids: Sequence[str],
                    split: str = "novel") -> list[dict[str, Any]]:
    """Episodes as the JSON records of an episode file (cases class-major, support first).

    Each record: `{"task": "classification", "split", "index", "classes", "ways", "shots", "queries",
    "cases": [{"role": "support"|"query", "case_id", "patient_key", "class"}]}`.
    """
    records = []
    for n, ep in enumerate(episodes):
        cases = [{"role": role, "case_id": ids[i], "patient_key": groups[i], "class": labels[i]}
                 for role, idx in (("support", ep.support), ("query", ep.query)) for i in idx]
        records.append({"task": "classification", "split": split, "index": n, "classes": list(ep.classes),
                        "ways": len(ep.classes), "shots": len(ep.support) // len(ep.classes),
                        "queries": len(ep.query) // len(ep.classes), "cases": cases})
    return records






def records_to_episodes(records: Sequence[dict[str, Any]], ids: Sequence[str], shots: int, queries: int,
                        path: Path | str = "episodes") -> list[Episode]:
    """Classification records -> `Episode`s indexing items by `ids`; checks counts against K and Q.

    Raises:
        InputError: a record of another task, an unknown case id, or a class with other than K support /
            Q query cases.
    """
    index = {case_id: i for i, case_id in enumerate(ids)}
    episodes = []
    for n, rec in enumerate(records):
        if rec["task"] != "classification" or "classes" not in rec:
            raise InputError(path, f"episode {n} is a {rec['task']!r} episode, not classification")
        classes = tuple(rec["classes"])
        support, query = [], []
        for role, out, want in (("support", support, shots), ("query", query, queries)):
            for name in classes:
                cases = [c for c in rec["cases"] if c["role"] == role and c.get("class") == name]
                if len(cases) != want:
                    raise InputError(path, f"episode {n}: {len(cases)} {role} cases of class {name!r}, but the "
                                     f"config asks for {want}; regenerate the file with matching shots/queries")
                for c in cases:
                    if c["case_id"] not in index:
                        raise InputError(path, f"episode {n}: case {c['case_id']!r} is not in this data/split")
                    out.append(index[c["case_id"]])
        episodes.append(Episode(classes, tuple(support), tuple(query)))
    return episodes


def fixed_set(labels: Sequence[str], groups: Sequence[str], ids: Sequence[str], classes: Sequence[str], ways: int,
              shots: int, queries: int, seed: int, n: int, split: str = "novel") -> list[dict[str, Any]]:
    """`n` seeded episode records over the items given; independent of item order (items are ranked by id)."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    labels, groups, ids = [labels[i] for i in order], [groups[i] for i in order], [ids[i] for i in order]
    sampler = EpisodeSampler(labels, groups, classes, ways, shots, queries, seed=seed)
    return episode_records(sampler.fixed(n), labels, groups, ids, split)


def evaluation_episodes(cfg: Any, split: dict[str, Any], labels: Sequence[str], groups: Sequence[str],
                        ids: Sequence[str], default_path: Path, episodes_file: Path | None = None) -> list[Episode]:
    """Evaluation episodes: from `episodes_file` (checked, then copied to `default_path`), else from `default_path`
    when it exists, else a fresh seeded set (what `python -m pipeline episodes` writes) saved there.

    Raises:
        InputError: the file (named) holds another task's episodes, unknown case ids or other K / Q; it is then
            not copied.
    """
    ep = cfg.episodes
    if episodes_file is not None or Path(default_path).exists():
        source = Path(episodes_file if episodes_file is not None else default_path)
        records = load_episode_set(source, "classification")
        episodes = records_to_episodes(records, ids, ep.shots, ep.queries, source)
        if source.resolve() != Path(default_path).resolve():
            save_episode_set(records, default_path)
        return episodes
    records = fixed_set(labels, groups, ids, split["novel"], ep.ways, ep.shots, ep.queries,
                        stream_seed(cfg.seed, "evaluation"), ep.eval_episodes)
    episodes = records_to_episodes(records, ids, ep.shots, ep.queries, default_path)
    save_episode_set(records, default_path)
    return episodes




class EpisodeDataset(EpisodeStream):
    """A stream of classification episode tensors `(sx, sy, qx, qy)`; episode `i` is drawn from
    `default_rng([seed, i])` (see `EpisodeStream` for workers and resuming).

    Args:
        x: items `(M, C, *spatial)` (shared with worker processes, not copied).
        labels, groups: class name and patient key per item.
        classes: classes episodes may use (e.g. the base classes).
        ways, shots, queries: N, K, Q.
        seed: stream seed.
        augment: optional `(batch, rng) -> batch` applied to support and query (training only).
        length: stream end, exclusive (None: endless).
        start: index of the first episode.
    """

    def __init__(self, x: torch.Tensor, labels: Sequence[str], groups: Sequence[str], classes: Sequence[str],
                 ways: int, shots: int, queries: int, seed: int = 0,
                 augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
                 length: int | None = None, start: int = 0) -> None:
        super().__init__(length, start)
        self.x = x
        self.sampler = EpisodeSampler(labels, groups, classes, ways, shots, queries, seed)  # checks minimums now
        self.seed, self.augment = seed, augment

    def episode(self, i: int) -> Episode:
        """Episode number `i` of the stream (indices only)."""
        return self.sampler.sample(rng=np.random.default_rng([self.seed, i]))

    def make(self, i: int) -> tuple[torch.Tensor, ...]:
        """Episode `i` as tensors: support `(N*K, C, *S)`, labels `(N*K,)`, query `(N*Q, C, *S)`, labels `(N*Q,)`."""
        s = self.sampler
        ep = self.episode(i)
        sy, qy = ep.labels(s.shots, s.queries)
        # Stacking per-item views: a fancy-index gather runs multi-threaded and crawls on a busy machine.
        sx = torch.stack([self.x[j] for j in ep.support])
        qx = torch.stack([self.x[j] for j in ep.query])
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, i, 1])
            sx, qx = self.augment(sx, rng), self.augment(qx, rng)
        return sx, torch.as_tensor(sy), qx, torch.as_tensor(qy)




# --- the `episodes` verb ---------------------------------------------------------------------------------------
def classification_episodes(cfg: Any, split: str, n: int) -> list[dict[str, Any]]:
    """`n` fixed classification episodes of class part `split` (`base`/`validation`/`novel`), exactly those
    `evaluate` draws for a run trained with the same config and data (same seed stream, same patients)."""
    from pipeline.classification.data import open_source

    if split not in PATIENT_PART:
        raise FewscanError(f"classification splits are {sorted(PATIENT_PART)}, not {split!r}")
    source = open_source(cfg)
    parts = source_split(cfg, source)
    if not parts[split]:
        raise FewscanError(f"the config holds out no {split} classes (split.{split} is empty)")
    cat = source.catalog(parts[split], split_groups(parts, split))
    ep = cfg.episodes
    return fixed_set(cat.labels, cat.groups, cat.ids, parts[split], ep.ways, ep.shots, ep.queries,
                     stream_seed(cfg.seed, "evaluation"), n, split)


def source_split(cfg: Config, source: object) -> dict:
    """The run's split (`make_split`) over a source's classes and patients."""
    cat = source.catalog()
    return make_split(cfg.split, source.classes, cat.groups, cfg.seed)


