"""Registration episodes: fixed, seeded (moving, fixed) pairs within a task, patients kept apart.

A *task* is one anatomy imaged in one modality (a Decathlon folder, one image channel). Inside a task the
patients of `data.root` are split, seeded, into three disjoint groups:
- `train`: meta-training pairs (with `extra_roots`, every patient of those folders is a training patient too);
- `adapt`: the few pairs of the new task used for test-time adaptation;
- `eval`: the held-out pairs every method is scored on.
A pair is a dict: `pair` (index), `task`, `anatomy`, `modality`, `channel`, `structures` (`{value: name}`),
`inter_subject`, and `cases`: `[{"role": "moving", ...}, {"role": "fixed", ...}]`, each case with `case_id`,
`patient_key` (salted hash), `image` and `label` (absolute paths; `label` None when the case has none).
Rules, all tested: moving and fixed share anatomy and modality; no patient of an `eval` or `adapt` pair appears in
a `train` pair; the same seed gives the same pairs.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.index import patient_key
from datasets.sources import DecathlonSet, load_label_map, load_nifti, read_decathlon
from datasets.volume import FewscanError, InputError, Volume
from pipeline.common.config import Config
from pipeline.common.episodes import EpisodeStream
from pipeline.common.progress import progress
from pipeline.common.splits import assign_patients

log = logging.getLogger(__name__)

SPLITS = ("train", "adapt", "eval")
NO_FOREGROUND = "label map has no foreground labels"
# One batch of pairs: moving `(B, 1, *S)`, fixed `(B, 1, *S)`, moving labels and fixed labels `(B, 1, *S)` or None.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
# the names the `episodes` verb uses for classification splits
SPLIT_ALIASES = {"test": "eval", "novel": "eval", "base": "train", "validation": "adapt"}


@dataclass(frozen=True)
class RegCase:
    """One image of one task."""

    case_id: str
    patient_key: str
    image: str
    label: str | None
    channel: int


@dataclass(frozen=True)
class RegTask:
    """One anatomy in one modality: its cases and label names."""

    name: str  # e.g. `Hippocampus/MRI`
    anatomy: str
    modality: str
    channel: int
    structures: dict[int, str]
    cases: tuple[RegCase, ...]
    primary: bool  # a task of `data.root` (held-out patients come from these)


def _patient(case_id: str, regex: str | None) -> str:
    """The patient a case belongs to: the regex's first group, or the case itself."""
    if regex is None:
        return case_id
    match = re.search(regex, case_id)
    if not match:
        raise FewscanError(f"registration.patient_regex {regex!r} does not match case {case_id!r}")
    return match.group(1) if match.groups() else match.group(0)


def _channels(dataset: DecathlonSet, wanted: list[int] | None) -> list[int]:
    known = sorted(int(k) for k in dataset.modality) or [0]
    if wanted is None:
        return known
    bad = [c for c in wanted if c not in known]
    if bad:
        raise InputError(dataset.root / "dataset.json", f"image channels {bad} not in modality {dataset.modality}")
    return list(wanted)


def registration_tasks(cfg: Config) -> list[RegTask]:
    """The tasks of `data.root` (primary) and of `registration.extra_roots`, one per image channel."""
    rcfg = cfg.registration
    roots = [(Path(cfg.data.root), True)] + [(Path(r), False) for r in rcfg.extra_roots]
    tasks = []
    for root, primary in roots:
        if not (root / "dataset.json").is_file():
            raise InputError(root, "not a Decathlon folder (no dataset.json)")
        dataset = read_decathlon(root)
        train_cases = [c for c in dataset.cases if c.split == "train"]
        if len(train_cases) < 2:
            raise InputError(root / "dataset.json", "registration needs at least 2 training cases")
        for ch in _channels(dataset, rcfg.image_channels):
            modality = dataset.modality.get(str(ch), "")
            # keyed by folder too: case names such as `case_001` repeat across Decathlon tasks
            cases = tuple(RegCase(c.case_id, patient_key(f"{dataset.name}/{_patient(c.case_id, rcfg.patient_regex)}"),
                                  str(c.image),
                                  str(c.label) if c.label else None, ch) for c in train_cases)
            tasks.append(RegTask(f"{dataset.name}/{modality or ch}", dataset.name, modality, ch,
                                 dict(dataset.label_names), cases, primary))
    return tasks


def patient_groups(task: RegTask, cfg: Config) -> dict[str, list[str]]:
    """Seeded split of a primary task's patients into `train` / `adapt` / `eval` (sorted keys), dealt by
    `pipeline.common.splits.assign_patients`.

    Depends only on the set of patients and the seed, so every channel of one folder gets the same split.
    """
    rcfg = cfg.registration
    patients = sorted({c.patient_key for c in task.cases})
    if not task.primary:
        return {"train": patients, "adapt": [], "eval": []}
    least = 2 if rcfg.pairing == "inter" else 1  # patients an inter-subject group needs to form one pair
    if 0 < rcfg.adapt_patients < least:
        raise FewscanError(f"registration.adapt_patients must be 0 or at least {least} for {rcfg.pairing} pairs")
    n_held = max(least + rcfg.adapt_patients, int(round(rcfg.test_patients * len(patients))))
    if len(patients) - n_held < least:
        raise FewscanError(f"{task.name}: {len(patients)} patients are too few to hold out {n_held} "
                           f"(lower registration.test_patients / adapt_patients)")
    return assign_patients(patients, {"adapt": rcfg.adapt_patients, "eval": n_held - rcfg.adapt_patients}, cfg.seed)


def _case_dict(case: RegCase, role: str) -> dict[str, Any]:
    return {"role": role, "case_id": case.case_id, "patient_key": case.patient_key, "image": case.image,
            "label": case.label}


def _candidates(task: RegTask, patients: list[str], pairing: str) -> dict[str, list[tuple[RegCase, RegCase]]]:
    """All admissible (moving, fixed) pairs among `patients`, keyed by the fixed case id."""
    keep = set(patients)
    cases = [c for c in task.cases if c.patient_key in keep]
    out: dict[str, list[tuple[RegCase, RegCase]]] = defaultdict(list)
    for fixed in cases:
        for moving in cases:
            if moving is fixed:
                continue
            same = moving.patient_key == fixed.patient_key
            if same == (pairing == "intra"):
                out[fixed.case_id].append((moving, fixed))
    return out


def fixed_pairs(cfg: Config, split: str, n: int | None = None) -> list[dict[str, Any]]:
    """The fixed, seeded list of registration pairs of one split.

    Pairs are grouped by fixed image (`registration.pairs_per_task` movings per fixed case, one meta-training
    task each), fixed images taken in a seeded order across tasks, until `n` pairs.

    Args:
        cfg: run config (`data.root`, `registration`, `seed`).
        split: `train`, `adapt` or `eval` (also `base`, `validation`, `novel`/`test`: see `SPLIT_ALIASES`).
        n: number of pairs; default `registration.train_pairs` / `adapt_pairs` / `eval_pairs`.

    Returns:
        Pair dicts (see the module docstring), at most `n`; fewer when the split has fewer admissible pairs.
    """
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise FewscanError(f"unknown registration split {split!r} (known: {list(SPLITS)})")
    rcfg = cfg.registration
    n = n if n is not None else {"train": rcfg.train_pairs, "adapt": rcfg.adapt_pairs, "eval": rcfg.eval_pairs}[split]
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    # group candidates per (task, fixed case); each group contributes up to `per_fixed` movings in seeded order
    per_fixed = rcfg.pairs_per_task if split == "train" else 1
    groups = []
    for task in registration_tasks(cfg):
        patients = patient_groups(task, cfg)[split]
        for _fixed_id, cands in sorted(_candidates(task, patients, rcfg.pairing).items()):
            groups.append((task, [cands[i] for i in rng.permutation(len(cands))]))
    order = [groups[i] for i in rng.permutation(len(groups))]
    pairs: list[dict[str, Any]] = []
    # round-robin over fixed images: first `per_fixed` movings of each, then the next ones, until n
    for start in range(0, max((len(g[1]) for g in order), default=0), per_fixed):
        for task, cands in order:
            for moving, fixed in cands[start:start + per_fixed]:
                if len(pairs) == n:
                    return pairs
                pairs.append({"pair": len(pairs), "task": task.name, "anatomy": task.anatomy,
                              "modality": task.modality, "channel": task.channel,
                              "structures": {str(k): v for k, v in task.structures.items()},
                              "inter_subject": moving.patient_key != fixed.patient_key,
                              "cases": [_case_dict(moving, "moving"), _case_dict(fixed, "fixed")]})
    return pairs


def roles(pair: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (moving, fixed) case dicts of a pair."""
    by_role = {c["role"]: c for c in pair["cases"]}
    return by_role["moving"], by_role["fixed"]


# --- prepared volumes and training episodes ---------------------------------------------------------------------------
def preprocess(cfg: Config, image: Volume, label: Volume | None, channel: int,
               modality: str) -> tuple[Volume, Volume | None]:
    """`transforms.volume_preset` (orientation, spacing, intensity, centre crop/pad) of one case.

    Returns:
        The prepared image `(I, J, K)` float32 and label map `(I, J, K)` int64 (or None), with the prepared affine.
    """
    from transforms.presets import volume_preset, volume_to_dict

    data = volume_preset(cfg.transforms, modality)(volume_to_dict(image, label))
    affine = np.asarray(data["image"].affine, dtype=float)
    if channel >= data["image"].shape[0]:
        raise FewscanError(f"image has {data['image'].shape[0]} channels, channel {channel} requested")
    img = Volume(np.asarray(data["image"][channel], dtype=np.float32), affine, {"modality": modality})
    lab = Volume(np.asarray(data["label"][0]).round().astype(np.int64), affine) if "label" in data else None
    return img, lab


def labels_on_image(labels: Volume, image: Volume, path: Path, image_path: Path) -> Volume:
    """`labels` on the grid of its image: as they are when the grids coincide, else resampled nearest-neighbour in
    world coordinates (as segmentation's cases are), so a label map stored on another grid lands on its voxels.

    Raises:
        InputError: naming `path`, when no foreground label falls inside the image (the grids do not overlap).
    """
    from pipeline.registration.deformation import resample_to

    grid = Volume(np.zeros(image.array.shape[:3], np.float32), image.affine)
    if labels.array.shape[:3] == grid.array.shape and np.allclose(labels.affine, image.affine, atol=1e-3):
        return labels
    on_grid = resample_to(labels, grid, nearest=True)
    if not on_grid.array.any():
        raise InputError(path, f"label map does not overlap its image {image_path} (none of its foreground labels "
                         "falls inside the image's grid)")
    log.debug("%s: label grid differs from its image; resampled nearest-neighbour", path)
    return on_grid


def case_labels(case: dict[str, Any], image: Volume, required: bool) -> Volume | None:
    """The label map of a pair's case on its image's grid, or None when the case has none to use.

    Empty-label policy. Training (and adaptation) pairs: an all-background map is treated like a missing one,
    with a warning naming the file, as nnU-Net and MONAI train on cases whose reference is empty; the case's
    pairs then train on image similarity alone (a Dice term against an empty fixed map would teach the network
    to warp the moving structures out of the volume). Held-out pairs (`required`): an error. MONAI's
    `ignore_empty` would leave such a pair out of the Dice mean, but these pairs are fixed at training and every
    method is compared on all of them pair by pair, so a pair without Dice would silently shrink (or turn into
    NaN) the paired comparisons; and in a registration data set every case shows the anatomy, so an empty map
    is a failed annotation to fix, not a negative case.

    Raises:
        InputError: naming the file: `required` and no labels (none listed, or all background); or labels that
            do not overlap their image.
    """
    if not case["label"]:
        if required:
            raise InputError(case["image"], "has no label map; held-out pairs need labels on both sides for Dice")
        return None
    path = Path(case["label"])
    labels = load_label_map(path)
    if not labels.array.any():
        if required:
            raise InputError(path, f"{NO_FOREGROUND}; held-out pairs need labels on both sides for Dice")
        log.warning("%s: %s; its case is used without labels (image similarity only)", path, NO_FOREGROUND)
        return None
    return labels_on_image(labels, image, path, Path(case["image"]))


class PairData:
    """Prepared volumes of a set of pairs, each case loaded once; moving images pre-aligned per pair on request.

    With `labels_required` (the held-out pairs) every case must have a label map with foreground (`case_labels`).
    """

    def __init__(self, cfg: Config, pairs: list[dict[str, Any]], labels_required: bool = False) -> None:
        self.cfg = cfg
        self.pairs = pairs
        self.cases: dict[tuple[str, int], tuple[Volume, Volume | None]] = {}
        for pair in pairs:
            for case in pair["cases"]:
                key = (case["image"], pair["channel"])
                if key not in self.cases:
                    image = load_nifti(Path(case["image"]))
                    label = case_labels(case, image, labels_required)
                    self.cases[key] = preprocess(cfg, image, label, pair["channel"], pair["modality"])
        self.shape = self._common_shape()
        self.aligned: dict[int, tuple[Volume, Volume | None, float]] = {}
        if cfg.registration.prealign == "sitk":
            for i in progress(range(len(pairs)), desc="SimpleITK affine pre-alignment", unit="pair"):
                self.aligned[i] = self._sitk_affine(i)

    def _common_shape(self) -> tuple[int, ...]:
        """The one shape of every prepared image (`(0, 0, 0)` without pairs).

        Raises:
            FewscanError: naming a file of each of two shapes, when they differ (no `transforms.volume_size`).
        """
        by_shape = {v[0].array.shape: image for (image, _), v in self.cases.items()}
        if len(by_shape) > 1:
            (a, file_a), (b, file_b) = sorted(by_shape.items())[:2]
            more = f" ({len(by_shape)} shapes in all)" if len(by_shape) > 2 else ""
            raise FewscanError(f"prepared volumes differ in shape: {file_a} is {list(a)} voxels, {file_b} is "
                               f"{list(b)}{more}: set transforms.volume_size (multiples of "
                               f"{self.cfg.registration.size_divisor()}) so that every volume shares one grid")
        return next(iter(by_shape), (0, 0, 0))

    def volumes(self, i: int) -> tuple[Volume, Volume, Volume | None, Volume | None]:
        """Moving, fixed, moving labels, fixed labels of pair `i` (moving pre-aligned when configured)."""
        moving, fixed = roles(self.pairs[i])
        ch = self.pairs[i]["channel"]
        (mv, ml), (fv, fl) = self.cases[(moving["image"], ch)], self.cases[(fixed["image"], ch)]
        if i in self.aligned:
            mv, ml, _ = self.aligned[i]
        return mv, fv, ml, fl

    def _sitk_affine(self, i: int) -> tuple[Volume, Volume | None, float]:
        from pipeline.registration.classical import register_sitk, warp_labels

        moving, fixed = roles(self.pairs[i])
        ch = self.pairs[i]["channel"]
        (mv, ml), (fv, _) = self.cases[(moving["image"], ch)], self.cases[(fixed["image"], ch)]
        warped, transform, seconds = register_sitk(fv, mv, "affine", seed=self.cfg.seed)
        return warped, warp_labels(ml, fv, transform) if ml is not None else None, seconds

    def batch(self, indices: list[int]) -> Batch:
        """Tensors `(B, 1, *S)` of the given pairs; label tensors only when every pair has labels."""
        vols = [self.volumes(i) for i in indices]
        stack = [torch.stack([torch.from_numpy(np.asarray(v[k].array))[None] for v in vols]).float()
                 if all(v[k] is not None for v in vols) else None for k in range(4)]
        return stack[0], stack[1], stack[2], stack[3]


class RegEpisodes(EpisodeStream):
    """Training tasks for a DataLoader: episode `i` is a list of batches `(moving, fixed, moving labels, fixed
    labels)`, each `(B, 1, *S)`, drawn from `default_rng([seed, i])` (the same stream for any worker count).

    Reptile (`registration.meta: reptile`): one task = one fixed image; one batch of `pairs_per_task` of its pairs
    per inner step. Joint training: one batch of `pairs_per_task` training pairs.
    """

    def __init__(self, data: PairData, cfg: Config, length: int, start: int = 0) -> None:
        super().__init__(length, start)
        self.data, self.cfg = data, cfg
        tasks: dict[tuple[str, str], list[int]] = defaultdict(list)  # (task, fixed case) -> pair indices
        for i, pair in enumerate(data.pairs):
            tasks[(pair["task"], roles(pair)[1]["image"])].append(i)
        self.groups = list(tasks.values())

    def make(self, i: int) -> list[Batch]:
        rcfg = self.cfg.registration
        rng = np.random.default_rng([self.cfg.seed, i])
        if rcfg.meta == "joint":
            n = len(self.data.pairs)
            return [self.data.batch(list(rng.choice(n, size=min(rcfg.pairs_per_task, n), replace=False)))]
        group = self.groups[rng.integers(len(self.groups))]
        size = min(rcfg.pairs_per_task, len(group))
        return [self.data.batch(list(rng.choice(group, size, False))) for _ in range(rcfg.inner_steps)]
