"""Organ-patch classification sets: 2D axial patches cut around the structures of labelled volumes, as an npz.

Input is one or more subjects, each an (image, label map, name table) triple: e.g. TotalSegmentator's
`example_ct_sm.nii.gz` + `example_seg.nii.gz` + `class_map_total.json` (table `total`). Every subject goes through
the project's MONAI volume preset (`transforms.presets.volume_preset`: RAS, in-plane resampling to a common
spacing with the label map nearest-neighbour, CT window or MR percentiles to [0, 1]); patches are then cut on
the resampled axial slices, centred on randomly drawn voxels of each structure.

Groups (what the episode sampler keeps apart between support and query) are **pseudo-patients**: with only a
few subjects there are not enough real patients for K+Q distinct ones per class, so a group is one
(subject, z-slab) pair, the slabs being consecutive, non-overlapping `slab_mm` ranges of axial slices (default
10 mm: on the three TotalSegmentator examples that gives the kidneys 10-12 groups, enough for 5-shot 5-query).
A patch is a single axial slice, so patches of different groups never share a voxel; but neighbouring slabs of
the same subject are anatomically close (the same organ a few mm apart), so support/query pairs from one subject
are easier than pairs from different patients would be. Results on such sets measure few-shot recognition of
organs across slabs and modalities, not generalisation to new patients. With many real subjects, pass
`slab_mm=None` (CLI `--slab 0`): one group per subject, i.e. patient-disjoint episodes.

The written npz (MedMNIST-style, read by the `npz` source) holds `images` `(N, H, W)` uint8 (rows anterior to
posterior, columns patient right to left, i.e. radiological display), `labels` `(N,)` int64 indices into
`class_names` `(C,)`, `groups` `(N,)` (`s<subject>/z<slab>`), and for checks `centres` `(N, 3)` float32 (RAS mm of
each patch's centre voxel), `subjects` `(N,)` int16 and `modalities` `(S,)`. Subjects are numbered in input
order; file names (which may carry patient IDs) are not stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.volume import FewscanError, InputError, Volume, atomic_path

log = logging.getLogger(__name__)

MODALITIES = ("CT", "MR")


@dataclass
class Subject:
    """One labelled volume.

    Attributes:
        image: canonical (RAS+) image `(I, J, K)`, HU for CT.
        labels: integer label map `(I, J, K)` on the image's grid.
        names: label value -> structure name (background 0 not needed).
        modality: `CT` or `MR` (picks the intensity preset).
    """

    image: Volume
    labels: Volume
    names: dict[int, str]
    modality: str


@dataclass
class PatchSet:
    """Patches of several subjects; see the module docstring for the npz layout.

    Attributes:
        images: `(N, H, W)` uint8, the preset's [0, 1] intensities times 255.
        labels: `(N,)` int64 indices into `class_names`.
        class_names: structure names, sorted.
        groups: `(N,)` pseudo-patient keys `s<subject>/z<slab>`.
        centres: `(N, 3)` float32 RAS mm of each patch's centre voxel (on the resampled grid).
        subjects: `(N,)` int16 subject index (input order).
        modalities: modality per subject.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray
    centres: np.ndarray
    subjects: np.ndarray
    modalities: list[str]


def read_names(spec: str | Path) -> dict[int, str]:
    """A label-name table from `FILE` or `FILE:TABLE` (e.g. `class_map_total.json:total_mr`).

    Raises:
        InputError: unreadable file, or a file with several tables and none named.
    """
    from datasets.sources import read_label_names

    spec = str(spec)
    path, key = Path(spec), None
    if not path.is_file() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        path, key = Path(head), tail
    if not path.is_file():
        raise InputError(path, "label-name table not found")
    return read_label_names(path, key)


def guess_modality(image: Volume) -> str:
    """`CT` or `MR`: the DICOM modality when known, else CT when the 0.5th percentile is below -500 (air in HU)."""
    stored = str(image.meta.get("modality") or "").upper()
    if stored.startswith(MODALITIES):
        return stored[:2]
    return "CT" if float(np.percentile(image.array, 0.5)) < -500 else "MR"


def load_subject(image: Path, labels: Path, names: dict[int, str], modality: str | None = None) -> Subject:
    """Read an image (DICOM folder, NIfTI, NRRD, MHA) and its label map, aligned in world coordinates.

    The label map must lie on the image grid up to axis order and flips (`datasets.labels.load_labels`); values
    missing from `names` are an error.

    Raises:
        InputError: unreadable files, mismatched geometry, label values without a name, a 4D image.
    """
    from datasets.labels import load_labels
    from datasets.sources import label_counts
    from datasets.volume_io import load_volume

    vol = load_volume(Path(image))
    if vol.array.ndim != 3:
        raise InputError(image, f"expected a 3D image, got shape {vol.array.shape}")
    lab = load_labels(Path(labels), image=vol)
    if lab.array.ndim != 3:
        raise InputError(labels, f"expected a 3D label map, got shape {lab.array.shape}")
    unnamed = sorted(set(label_counts(lab.array)) - set(names))
    if unnamed:
        raise InputError(labels, f"label values {unnamed[:10]} have no name in the label-name table")
    kind = (modality or guess_modality(vol)).upper()
    if kind not in MODALITIES:
        raise FewscanError(f"{image}: modality {modality!r} is not one of {list(MODALITIES)}")
    log.info("subject: %s %s at %s mm", kind, vol.array.shape, np.round(vol.spacing, 2))  # no file names: IDs
    return Subject(vol, Volume(np.asarray(lab.array).astype(np.int32), lab.affine, lab.meta), dict(names), kind)


def _prepared(subject: Subject, spacing: float, ct_window: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subject through the volume preset: image `(I, J, K)` in [0, 1], labels `(I, J, K)`, affine `(4, 4)`.

    In-plane spacing becomes `spacing`; the slice spacing is kept (no interpolation across slices).
    """
    from transforms.config import TransformConfig
    from transforms.presets import volume_preset, volume_to_dict

    z = subject.image.spacing[2]
    cfg = TransformConfig(preset=subject.modality.lower(), spacing=(spacing, spacing, z), ct_window=ct_window)
    label = Volume(subject.labels.array.astype(np.float32), subject.labels.affine)
    out = volume_preset(cfg, subject.modality)(volume_to_dict(subject.image, label))
    image = np.asarray(out["image"][0], dtype=np.float32)
    labels = np.rint(np.asarray(out["label"][0])).astype(np.int32)
    return image, labels, np.asarray(out["image"].affine, dtype=float)


def _axial_patch(padded: np.ndarray, i: int, j: int, k: int, size: int) -> np.ndarray:
    """`(size, size)` axial patch of a volume padded by `size` in I and J, its centre voxel `(i, j, k)` (unpadded
    indices) at `[size // 2, size // 2]`; rows run anterior to posterior, columns right to left."""
    h = size // 2
    rows = slice(i + h + 1, i + h + size + 1)  # i - (size - 1 - h) .. i + h, shifted by the pad of `size`
    cols = slice(j + h + 1, j + h + size + 1)
    return padded[rows, cols, k][::-1, ::-1].T


def organ_patches(
    subjects: Sequence[Subject],
    *,
    size: int = 32,
    spacing: float = 1.5,
    slab_mm: float | None = 10.0,
    per_group: int = 20,
    min_groups: int = 6,
    min_voxels: int = 20,
    structures: Sequence[str] | None = None,
    ct_window: str = "soft_tissue",
    seed: int = 0,
) -> PatchSet:
    """Cut 2D axial patches centred on voxels of every labelled structure.

    Args:
        subjects: labelled volumes (`load_subject`); structures are matched across subjects by name.
        size: patch side in voxels at `spacing` (32 at 1.5 mm: 48 mm).
        spacing: common in-plane voxel size, mm.
        slab_mm: thickness of the z-slabs that make the pseudo-patient groups; None or 0: one group per subject.
        per_group: at most this many patches per (structure, group), centres drawn without replacement.
        min_groups: keep only structures present in at least this many groups (the episode sampler needs K+Q
            groups per class: 6 for 1-shot 5-query, 10 for 5-shot 5-query).
        min_voxels: a structure with fewer voxels than this in a slab (at the resampled grid) is skipped there.
        structures: keep only these names (default all).
        ct_window: CT window name of `transforms.presets.CT_WINDOWS` (MR: percentiles 1-99 to [0, 1]).
        seed: the same seed and inputs give the same patches (each (subject, structure, slab) has its own stream).

    Raises:
        FewscanError: unknown names in `structures`, bad sizes, or no structure with `min_groups` groups.
    """
    from transforms.presets import CT_WINDOWS

    if size < 2 or spacing <= 0 or (slab_mm or 0) < 0 or per_group < 1 or min_groups < 1:
        raise FewscanError("patches: size >= 2, spacing > 0, slab >= 0, per-group >= 1 and min-groups >= 1 needed")
    if ct_window not in CT_WINDOWS:
        raise FewscanError(f"patches: unknown CT window {ct_window!r} (known: {sorted(CT_WINDOWS)})")
    known = {n for s in subjects for n in s.names.values()}
    if structures is not None and set(structures) - known:
        raise FewscanError(f"patches: structures not in any label-name table: {sorted(set(structures) - known)}")
    wanted = set(structures) if structures is not None else None
    found: dict[str, list[tuple[np.ndarray, str, np.ndarray, int]]] = {}  # name -> (patches, group, centres, subj)
    for si, subject in enumerate(subjects):
        for name, part in _subject_patches(subject, si, size, spacing, slab_mm, per_group, min_voxels, wanted,
                                           ct_window, seed):
            found.setdefault(name, []).append(part)
    return _assemble(found, min_groups, slab_mm, [s.modality for s in subjects])


def _subject_patches(subject: Subject, si: int, size: int, spacing: float, slab_mm: float | None, per_group: int,
                     min_voxels: int, wanted: set[str] | None, ct_window: str,
                     seed: int) -> list[tuple[str, tuple[np.ndarray, str, np.ndarray, int]]]:
    """One subject's patches: `(structure, (patches (n, size, size), group, centres (n, 3) RAS mm, si))` per slab."""
    image, labels, affine = _prepared(subject, spacing, ct_window)
    padded = np.pad(image, ((size, size), (size, size), (0, 0)))
    depth = np.arange(image.shape[2]) * float(np.linalg.norm(affine[:3, 2]))  # mm above the first slice
    slab_of = ((depth + 1e-6) // slab_mm).astype(int) if slab_mm else np.zeros(image.shape[2], int)
    out = []
    for value, name in sorted(subject.names.items()):
        if value == 0 or (wanted is not None and name not in wanted):
            continue
        for slab in np.unique(slab_of):
            ks = np.flatnonzero(slab_of == slab)
            voxels = np.argwhere(labels[:, :, ks] == value)
            if len(voxels) < min_voxels:
                continue
            rng = np.random.default_rng([seed, si, value, int(slab)])
            pick = voxels[np.sort(rng.choice(len(voxels), min(per_group, len(voxels)), replace=False))]
            pick[:, 2] = ks[pick[:, 2]]
            patches = np.stack([_axial_patch(padded, i, j, k, size) for i, j, k in pick])
            centres = (affine @ np.c_[pick, np.ones(len(pick))].T)[:3].T
            out.append((name, (patches, f"s{si}/z{int(slab):02d}", centres, si)))
    return out


def _assemble(found: dict[str, list[tuple[np.ndarray, str, np.ndarray, int]]], min_groups: int,
              slab_mm: float | None, modalities: list[str]) -> PatchSet:
    """Keep structures present in at least `min_groups` groups and stack their patches into a `PatchSet`."""
    counts = {name: len({g for _, g, _, _ in parts}) for name, parts in found.items()}
    kept = sorted(n for n, c in counts.items() if c >= min_groups)
    dropped = {n: c for n, c in sorted(counts.items()) if c < min_groups}
    if dropped:
        log.info("structures in fewer than %d groups, left out: %s", min_groups, dropped)
    if not kept:
        raise FewscanError(f"patches: no structure is present in >= {min_groups} groups (subject"
                           + (f", {slab_mm:g} mm slab)" if slab_mm else ")")
                           + f"; groups per structure: {dict(sorted(counts.items()))}")
    parts = [(p, g, c, s, k) for k, n in enumerate(kept) for p, g, c, s in found[n]]
    sizes = [len(p) for p, *_ in parts]
    return PatchSet(
        images=np.rint(np.clip(np.concatenate([p for p, *_ in parts]), 0, 1) * 255).astype(np.uint8),
        labels=np.repeat([k for *_, k in parts], sizes).astype(np.int64),
        class_names=kept,
        groups=np.repeat([g for _, g, *_ in parts], sizes),
        centres=np.concatenate([c for _, _, c, _, _ in parts]).astype(np.float32),
        subjects=np.repeat([s for _, _, _, s, _ in parts], sizes).astype(np.int16),
        modalities=modalities,
    )


def write_patches(patches: PatchSet, out: Path, settings: dict | None = None) -> Path:
    """Write the npz atomically (nothing is left behind on failure); `settings` is stored as JSON text."""
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh, images=patches.images, labels=patches.labels, class_names=np.asarray(patches.class_names),
            groups=np.asarray(patches.groups), centres=patches.centres, subjects=patches.subjects,
            modalities=np.asarray(patches.modalities), settings=np.asarray(json.dumps(settings or {})))
    return out


def summary(patches: PatchSet) -> str:
    """One line per class: patches and groups, e.g. for the CLI."""
    lines = [f"{len(patches.labels)} patches {patches.images.shape[1:]} of {len(patches.class_names)} structures "
             f"from {len(patches.modalities)} subjects ({', '.join(patches.modalities)})"]
    for k, name in enumerate(patches.class_names):
        sel = patches.labels == k
        lines.append(f"  {name:<32} {int(sel.sum()):5d} patches  {len(set(patches.groups[sel])):3d} groups")
    return "\n".join(lines)
