"""Segmentation cases and episodes: labelled (one structure, K support + Q query patients) and self-supervised.

A *case* is one preprocessed scan (canonical RAS, optional resampling, intensities in [0, 1]) with an optional
integer label map and its structure names. Episodes only name cases; tensors are cut when they are used.

Rules enforced here, and tested:
- held-out structures never appear in a training episode (and in Setting 2 of SSL-ALPNet, training slices or
  crops that *contain* a held-out structure are dropped as well);
- no patient is on both the support and the query side of a labelled episode (self-supervised episodes take
  support and query from one scan, by construction, as in SSL-ALPNet);
- the same seed gives the same episodes.
2D mode uses axial slices (the last RAS axis); 3D mode uses crops of `segmentation.crop` voxels.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from datasets.volume import FewscanError
from pipeline.common.config import Config, SegmentationConfig
from pipeline.common.episodes import EpisodeStream, stream_seed
from pipeline.segmentation.data import Case, load_cases, make_case, split_patients, split_structures
from pipeline.segmentation.supervoxels import body_mask, pick_region, supervoxels
from transforms.augment import augment_view, check_view_augment
from transforms.config import AugmentConfig
from transforms.crop import crop_at

log = logging.getLogger(__name__)



















def _draw(rng: np.random.Generator, cases: list[Case], structure: str, shots: int,
          queries: int) -> tuple[list[Case], list[Case]]:
    """K support and Q query cases containing `structure`, from disjoint patients."""
    by_patient: dict[str, list[Case]] = {}
    for c in cases:
        if structure in c.structures():
            by_patient.setdefault(c.patient_key, []).append(c)
    keys = sorted(by_patient)
    if len(keys) < shots + 1:
        raise FewscanError(f"structure {structure!r}: {len(keys)} patients have it, need shots+1 = {shots + 1}")
    order = rng.permutation(len(keys))
    n_query = min(queries, len(keys) - shots)
    pick = lambda idx: [by_patient[keys[i]][int(rng.integers(len(by_patient[keys[i]])))] for i in idx]  # noqa: E731
    return pick(order[:shots]), pick(order[shots:shots + n_query])


def episode_record(structure: str, support: list[Case], query: list[Case]) -> dict[str, Any]:
    """The JSON form of an episode: the structure and its cases with their roles."""
    cases = [{"role": role, "case_id": c.case_id, "patient_key": c.patient_key, "structure": structure}
             for role, group in (("support", support), ("query", query)) for c in group]
    return {"structure": structure, "cases": cases}


def role_ids(episode: dict[str, Any], role: str) -> list[str]:
    """Case ids of one side (`support` / `query`) of an episode record."""
    return [c["case_id"] for c in episode["cases"] if c["role"] == role]


def fixed_episodes(cfg: Config, split: str, n: int, cases: list[Case] | None = None,
                   split_seed: int | None = None) -> list[dict[str, Any]]:
    """A seeded, fixed list of `n` labelled episodes per structure of `split` ("test"/"novel" or "train"/"base").

    Exactly the episodes `pipeline.segmentation.evaluate.evaluate` scores (split "test", n = `episodes.eval_episodes`).
    Drawn from the evaluation stream (`stream_seed(cfg.seed, "evaluation")`) whatever the split, as classification's.

    Args:
        split_seed: the seed the run's patients were split with (default `cfg.seed`); `evaluate --set seed=N`
            draws other episodes from the same held-out patients.

    Returns:
        `[{"structure", "cases": [{"role", "case_id", "patient_key", "structure"}, ...]}, ...]`, structures in
        sorted order, `n` episodes each.
    """
    aliases = {"test": "test", "novel": "test", "train": "train", "base": "train"}
    if split not in aliases:
        raise FewscanError(f"segmentation episode splits are 'test' (alias 'novel') and 'train' ('base'), "
                           f"not {split!r}")
    split = aliases[split]
    cases = load_cases(cfg) if cases is None else cases
    structures = split_structures(cases, cfg.segmentation.held_out)[split]
    train_cases, test_cases = split_patients(cases, cfg.segmentation.test_patients,
                                             cfg.seed if split_seed is None else split_seed)
    pool = test_cases if split == "test" else train_cases
    rng = np.random.default_rng(stream_seed(cfg.seed, "evaluation"))
    episodes = []
    for structure in structures:
        seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        for _ in range(n):
            for _ in range(20):  # few patients: prefer an episode not drawn yet (repeats only when exhausted)
                support, query = _draw(rng, pool, structure, cfg.episodes.shots, cfg.episodes.queries)
                key = (tuple(sorted(c.case_id for c in support)), tuple(sorted(c.case_id for c in query)))
                if key not in seen:
                    break
            seen.add(key)
            episodes.append(episode_record(structure, support, query))
    return episodes


# --- tensors for training episodes -------------------------------------------------------------------


def _excluded(case: Case, held_out: list[str]) -> np.ndarray | None:
    """Voxels of held-out structures in a training case (Setting 2 drops slices/crops touching them)."""
    if case.label is None or not held_out:
        return None
    mask = np.zeros(case.image.shape, bool)
    for s in held_out:
        mask |= case.mask(s)
    return mask if mask.any() else None


def _view(case: Case, mask: np.ndarray, point: np.ndarray, scfg: SegmentationConfig,
          rng: np.random.Generator, augment: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask cut around `point`: a 2D axial slice crop `crop[:2]` or a 3D crop `crop`; the image
    augmented by `transforms.augment` when it is enabled (training views only: evaluation never cuts views here)."""
    if scfg.mode == "2d":
        size, k = tuple(scfg.crop[:2]), int(point[2])
        img, msk = crop_at(case.image[:, :, k], point[:2], size), crop_at(mask[:, :, k], point[:2], size)
    else:
        img, msk = crop_at(case.image, point, tuple(scfg.crop)), crop_at(mask, point, tuple(scfg.crop))
    return (augment_view(img, augment, rng) if augment.enabled else img), msk


def _stack(views: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([v[0] for v in views])[:, None]).float()
    m = torch.from_numpy(np.stack([v[1] for v in views])[:, None].astype(np.float32))
    return x, m


def _allowed(case: Case, scfg: SegmentationConfig, excluded: np.ndarray | None, point: np.ndarray) -> bool:
    """Setting 2: the slice (2D) or crop (3D) around `point` must not touch a held-out structure."""
    if excluded is None or scfg.setting == 1:
        return True
    if scfg.mode == "2d":
        return not excluded[:, :, int(point[2])].any()
    return not crop_at(excluded, point, tuple(scfg.crop)).any()


def labelled_episode(cases: list[Case], structures: list[str], cfg: Config, rng: np.random.Generator,
                     held_out: list[str], info: dict[str, Any] | None = None) -> tuple[torch.Tensor, ...] | None:
    """A training episode on one training structure: support/query images and masks `(K|Q, 1, *crop)`.

    Args:
        info: filled (when given) with the episode's `structure`, `record` and `views` `[(case_id, centre)]`.

    Returns None when Setting 2 leaves no allowed view (the caller draws again).
    """
    scfg = cfg.segmentation
    structure = structures[int(rng.integers(len(structures)))]
    support, query = _draw(rng, cases, structure, cfg.episodes.shots, cfg.episodes.queries)
    if info is not None:
        info.update(structure=structure, record=episode_record(structure, support, query), views=[])
    views = []
    for case in [*support, *query]:
        mask, excluded = case.mask(structure), _excluded(case, held_out)
        points = np.argwhere(mask)
        if excluded is not None and scfg.setting == 2 and scfg.mode == "2d":
            # Setting 2: draw only from slices that hold no held-out voxel
            points = points[~excluded.any(axis=(0, 1))[points[:, 2]]]
            if len(points) == 0:
                return None
        for _ in range(10):
            point = points[int(rng.integers(len(points)))]
            if _allowed(case, scfg, excluded, point):
                break
        else:
            return None
        if info is not None:
            info["views"].append((case.case_id, tuple(int(v) for v in point)))
        views.append(_view(case, mask, point, scfg, rng, cfg.transforms.augment))
    sx, sm = _stack(views[:len(support)])
    qx, qm = _stack(views[len(support):])
    return sx, sm, qx, qm


def case_supervoxels(case: Case, scfg: SegmentationConfig) -> np.ndarray:
    """The case's pseudo-structures, computed once and kept on the case."""
    if case._sv is None:
        case._sv = supervoxels(case.image, scfg.supervoxels, scfg.n_supervoxels)
    return case._sv


def pseudo_episode(cases: list[Case], cfg: Config, rng: np.random.Generator,
                   held_out: list[str]) -> tuple[torch.Tensor, ...] | None:
    """A self-supervised episode: one supervoxel of one scan is the structure (SSL-ALPNet).

    2D: support = an axial slice through the supervoxel, query = a neighbouring slice (SLIC, 3D regions) or the
    same slice (Felzenszwalb, 2D regions), differently augmented. 3D: support and query are two crops of the
    scan around the supervoxel, shifted by up to a quarter crop. K support views, one query view.

    Returns:
        `(sx, sm, qx, qm)` with shapes `(K, 1, *crop)` and `(1, 1, *crop)`, or None when nothing fits.
    """
    scfg = cfg.segmentation
    case = cases[int(rng.integers(len(cases)))]
    sv = case_supervoxels(case, scfg)
    excluded = _excluded(case, held_out) if scfg.setting == 2 else None
    if excluded is not None:
        sv = np.where(excluded.any(axis=(0, 1))[None, None, :], 0, sv)  # drop slices touching held-out organs
    region = pick_region(sv, rng)
    if region is None:
        return None
    mask = sv == region
    points = np.argwhere(mask)
    views = []
    for _ in range(cfg.episodes.shots):
        point = points[int(rng.integers(len(points)))]
        views.append(_view(case, mask, point, scfg, rng, cfg.transforms.augment))
    if scfg.mode == "2d":
        ks = np.unique(points[:, 2])
        near = ks[np.abs(ks - point[2]) <= 2] if scfg.supervoxels == "slic" else np.array([point[2]])
        k = int(rng.choice(near))
        in_slice = points[points[:, 2] == k]
        qpoint = in_slice[int(rng.integers(len(in_slice)))]
    else:
        qpoint = point + rng.integers(-(np.asarray(scfg.crop) // 4), np.asarray(scfg.crop) // 4 + 1)
    qview = _view(case, mask, qpoint, scfg, rng, cfg.transforms.augment)
    if qview[1].sum() == 0:
        return None
    sx, sm = _stack(views)
    qx, qm = _stack([qview])
    return sx, sm, qx, qm


def training_episode(cases: list[Case], cfg: Config, rng: np.random.Generator,
                     split: dict[str, list[str]]) -> tuple[torch.Tensor, ...]:
    """One training episode (self-supervised or labelled), retrying when a draw finds nothing usable."""
    for _ in range(100):
        if cfg.segmentation.supervision == "self":
            ep = pseudo_episode(cases, cfg, rng, split["test"])
        else:
            ep = labelled_episode(cases, split["train"], cfg, rng, split["test"])
        if ep is not None:
            return ep
    raise FewscanError("could not draw a training episode in 100 tries: with segmentation.setting=2, every "
                       "training slice may hold a held-out structure (use setting 1), or the volumes are tiny")


class SegEpisodes(EpisodeStream):
    """Training episodes `(sx, sm, qx, qm)` for a DataLoader; episode `i` is drawn from `default_rng([seed, i])`,
    so the stream is the same for any number of workers (see `EpisodeStream`)."""

    def __init__(self, cases: list[Case], cfg: Config, split: dict[str, list[str]], length: int,
                 start: int = 0) -> None:
        super().__init__(length, start)
        check_view_augment(cfg.transforms.augment)
        self.cases, self.cfg, self.split = cases, cfg, split

    def make(self, i: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([stream_seed(self.cfg.seed, "train"), i])
        return training_episode(self.cases, self.cfg, rng, self.split)


def precompute_supervoxels(cases: list[Case], scfg: SegmentationConfig, workers: int = 0) -> None:
    """Compute every case's pseudo-structures up front, in `workers` processes when > 0.

    Done before episode workers start: they are forked copies, and a supervoxel map computed lazily inside one
    of them would be recomputed by every worker and lost to the others.
    """
    todo = [c for c in cases if c._sv is None]
    if workers > 0 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            maps = list(pool.map(supervoxels, [c.image for c in todo], [scfg.supervoxels] * len(todo),
                                 [scfg.n_supervoxels] * len(todo)))
    else:
        maps = [supervoxels(c.image, scfg.supervoxels, scfg.n_supervoxels) for c in todo]
    for case, sv in zip(todo, maps, strict=True):
        case._sv = sv


def unlabelled_share(cases: list[Case]) -> float:
    """Share of cases without labels (for the log)."""
    return float(np.mean([c.label is None for c in cases])) if cases else 0.0


__all__ = ["Case", "SegEpisodes", "body_mask", "fixed_episodes", "labelled_episode", "load_cases", "make_case",
           "precompute_supervoxels", "pseudo_episode", "role_ids", "split_structures", "training_episode"]
