"""Segmentation cases: preprocessed scans with label maps and structure names, structure and patient splits.

A *case* is one scan preprocessed by the run's `transforms` preset (canonical RAS, optional resampling, intensities
in [0, 1]) with an optional integer label map and its structure names. Episodes
(`pipeline/segmentation/episodes.py`) only name cases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to

from datasets.index import patient_key
from datasets.volume import FewscanError, InputError, Volume
from pipeline.common.config import Config
from pipeline.common.splits import assign_patients
from transforms.config import TransformConfig
from transforms.presets import preset_kind, volume_preset, volume_to_dict

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One preprocessed scan.

    Attributes:
        image: `(I, J, K)` float32 in [0, 1], RAS+ (K axial).
        label: `(I, J, K)` int16 label map or None (unlabelled).
        names: label value -> structure name (background excluded).
        affine: `(4, 4)` voxel -> RAS mm of `image`.
    """

    case_id: str
    patient_key: str
    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None = None
    names: dict[int, str] = field(default_factory=dict)
    _sv: np.ndarray | None = None

    def mask(self, structure: str) -> np.ndarray:
        """Binary mask `(I, J, K)` of a named structure (all-false when absent)."""
        if self.label is None:
            return np.zeros(self.image.shape, bool)
        values = [v for v, n in self.names.items() if n == structure]
        return np.isin(self.label, values)

    def structures(self) -> set[str]:
        """Names of the structures with at least one voxel."""
        if self.label is None:
            return set()
        present = set(np.unique(self.label).tolist())
        return {n for v, n in self.names.items() if v in present}


def _label_on_grid(label: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A label map resampled into the prepared image grid `(shape, affine)` (nearest neighbour, world coordinates),
    so a label stored on another grid than its image lands on the right voxels. `(I, J, K)` int16."""
    lab = nib.Nifti1Image(np.asarray(label.array).astype(np.int16), label.affine)
    return np.asarray(resample_from_to(lab, (shape, affine), order=0).dataobj).astype(np.int16)


def make_case(case_id: str, image: Volume, label: Volume | None, names: dict[int, str],
              tcfg: TransformConfig, source: str = "") -> Case:
    """One case: the image's first channel through `transforms.presets.volume_preset` (RAS, optional spacing,
    intensities to [0, 1] by the CT window or MR percentiles of `tcfg`), its label map into the prepared grid.

    Args:
        image: `(I, J, K)` or `(I, J, K, C)` (first channel used); `meta["modality"]` picks the `auto` preset.
        label: integer label map, on any grid (resampled nearest-neighbour in world coordinates).
        tcfg: the run's `transforms` section.
    """
    where = source or case_id
    array = image.array[..., 0] if image.array.ndim == 4 else image.array  # multi-channel: first channel
    array = np.asarray(array, dtype=np.float32)  # float64 sources too: the float32 values are what is scaled
    if array.ndim != 3:
        raise InputError(where, f"expected a 3D volume, got shape {array.shape}")
    modality = image.meta.get("modality")
    # MR percentiles scale in float64 (numpy's percentiles are float64) and the CT window in float32: the arithmetic
    # segmentation cases have always had, so they stay bit for bit the same; both are stored as float32.
    dtype = torch.float64 if preset_kind(tcfg, modality) == "mr" else torch.float32
    prepared = volume_preset(tcfg, modality)(volume_to_dict(Volume(array, image.affine), dtype=dtype))["image"]
    data = np.asarray(prepared[0], dtype=np.float32)
    if min(data.shape) < 2:
        raise InputError(where, f"expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(prepared.affine, dtype=float)
    lab = None
    if label is not None:
        if label.array.shape[:3] != array.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            log.debug("%s: label grid differs from the image; resampling it (nearest neighbour)", where)
        lab = _label_on_grid(label, data.shape, affine)
    names = {int(v): str(n) for v, n in names.items() if int(v) != 0}  # background is not a structure
    return Case(case_id, patient_key(case_id), data, affine, lab, names)


def load_decathlon(root: Path, tcfg: TransformConfig) -> list[Case]:
    """Every image of a Decathlon-format folder (`datasets.sources.read_decathlon`): labelled `training` entries
    and unlabelled `test` entries (self-supervised training can use both), preprocessed by `tcfg`."""
    from datasets.sources import load_case, read_decathlon

    dataset = read_decathlon(Path(root))
    if not dataset.cases:
        raise InputError(Path(root) / "dataset.json", "lists no images")
    cases = []
    for entry in dataset.cases:
        image, label = load_case(dataset, entry)
        cases.append(make_case(entry.case_id, image, label, dataset.label_names, tcfg, str(entry.image)))
    return cases


def load_cases(cfg: Config) -> list[Case]:
    """The cases of `cfg.data.root` (a Decathlon-format folder), preprocessed by `cfg.transforms`."""
    if not cfg.data.root:
        raise FewscanError("data.root is empty: set it to a Decathlon-format folder")
    return load_decathlon(Path(cfg.data.root), cfg.transforms)


def split_structures(cases: list[Case], held_out: list[str]) -> dict[str, list[str]]:
    """`train` / `test` structure names; an empty `held_out` tests every labelled structure."""
    known = sorted(set().union(*(c.structures() for c in cases)))
    missing = [s for s in held_out if s not in known]
    if missing:
        raise FewscanError(f"segmentation.held_out names structures not in the labels: {missing} (known: {known})")
    test = sorted(held_out) if held_out else known
    return {"train": [s for s in known if s not in test], "test": test}


def split_patients(cases: list[Case], share: float, seed: int) -> tuple[list[Case], list[Case]]:
    """`(train, test)` cases: a seeded `share` of the labelled patients (at least one) is kept out of training,
    dealt by `pipeline.common.splits.assign_patients`.

    Unlabelled cases always train. With `share == 0` both sides are all cases (transductive: the evaluation
    scans' images, never their labels, are then seen by self-supervised training).
    """
    if share == 0:
        return list(cases), list(cases)
    labelled = {c.patient_key for c in cases if c.label is not None}
    n_test = max(1, round(share * len(labelled))) if labelled else 0
    test_keys = set(assign_patients(labelled, {"test": n_test}, seed)["test"])
    return ([c for c in cases if c.patient_key not in test_keys], [c for c in cases if c.patient_key in test_keys])
