"""Classification sources: files -> a labelled stack of preprocessed items (what episodes are drawn from).

Every source in `SOURCES` offers the same things:
- `classes`: all labelled class names;
- `catalog(classes)`: ids, labels and patient keys of those classes, cheaply (no pixels), for splits and
  episode files;
- `items(classes, groups)`: the preprocessed examples of those classes (and, when given, those patients).

Sources: `tcia` (manifest + findings CSV, crops around each finding), `npz` (MedMNIST-style arrays), `folder`
(class-per-folder PNG/JPEG or NIfTI files) and `decathlon` (a crop around every named structure of every case:
organ-patch classification). Patient keys are always pseudonymised (salted hash, `datasets.index.patient_key`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.volume import FewscanError, InputError
from datasets.world import lps_to_ras
from pipeline.common.config import Config
from pipeline.common.progress import progress
from transforms.crop import fit_size
from transforms.presets import crop_around, image_2d, prepare, volume_to_dict

log = logging.getLogger(__name__)


@dataclass
class Catalog:
    """Who is in a source, without pixels: parallel lists of length M."""

    labels: list[str]
    groups: list[str]  # pseudonymised patient keys
    ids: list[str]  # stable, non-identifying item ids (the `case_id` of episode files)


@dataclass
class Items:
    """Labelled examples for episodic sampling.

    Attributes:
        x: items of shape `(M, C, *spatial)`: `(M, 1, *roi)` crops for 3D sources, `(M, C, H, W)` for 2D ones.
        labels: class name per item, length M.
        groups: pseudonymised patient key per item, length M (episodes keep patients apart).
        ids: a stable, non-identifying id per item (e.g. series UID + finding id), length M.
    """

    x: torch.Tensor
    labels: list[str]
    groups: list[str]
    ids: list[str]


def _select(cat: Catalog, classes: Iterable[str] | None, groups: set[str] | None) -> list[int]:
    wanted = None if classes is None else set(classes)
    keep = [i for i, (label, group) in enumerate(zip(cat.labels, cat.groups, strict=True))
            if (wanted is None or label in wanted) and (groups is None or group in groups)]
    if not keep:
        raise FewscanError(f"no items of classes {sorted(wanted) if wanted else 'any'}"
                           + (" among the split's patients" if groups is not None else ""))
    return keep


def _subset(cat: Catalog, idx: list[int]) -> Catalog:
    return Catalog([cat.labels[i] for i in idx], [cat.groups[i] for i in idx], [cat.ids[i] for i in idx])


def _hash_groups(raw: Iterable[str], prefix: str) -> list[str]:
    """Pseudonymise group keys of npz/folder/decathlon sources (they may be patient IDs)."""
    from datasets.index import patient_key

    cache: dict[str, str] = {}
    return [cache.setdefault(g, patient_key(f"{prefix}:{g}")) for g in raw]


# --- tcia ------------------------------------------------------------------------------------------------------
class TciaSource:
    """Findings of a TCIA-style tree (via its manifest), cropped around each finding centre."""

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        col = cfg.data.label_column
        self.rows = [r for r in manifest_rows(cfg, run_dir) if r.get(col)]
        self.classes = sorted({r[col] for r in self.rows})
        self._catalog = Catalog([r[col] for r in self.rows], [_row_group(r) for r in self.rows],
                                [_row_id(r, n) for n, r in enumerate(self.rows)])

    def catalog(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Catalog:
        """Ids, labels and patient keys of the wanted findings."""
        return _subset(self._catalog, _select(self._catalog, classes, groups))

    def items(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Items:
        """Preprocessed crops of `classes` (all when None), from the patients in `groups` (all when None)."""
        idx = _select(self._catalog, classes, groups)
        return load_items(self.cfg, [self.rows[i] for i in idx], ids=[self._catalog.ids[i] for i in idx])


def _row_group(row: dict[str, str]) -> str:
    return row.get("patient_key") or row.get("series_key") or row["path"]


def _row_id(row: dict[str, str], n: int) -> str:
    return f"{row.get('series_uid') or row.get('series_key') or row['path']}#{row.get('lesion_id') or n}"


def manifest_rows(cfg: Config, run_dir: Path | None = None) -> list[dict[str, str]]:
    """The manifest named in the config, or a fresh index of `data.root` (written into `run_dir` without file
    paths, which name patient folders: `datasets.manifest`)."""
    from datasets.index import index_tree, locate, read_manifest, write_manifest

    if cfg.data.manifest:
        manifest = Path(cfg.data.manifest)
        return locate(read_manifest(manifest), manifest, Path(cfg.data.root) if cfg.data.root else None)
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise InputError(root, "data.root is not a folder")
    labels = root / cfg.data.labels if cfg.data.labels else None
    if labels is not None and not labels.is_file():
        raise InputError(labels, "findings CSV named by data.labels not found")
    rows = index_tree(root, labels=labels)
    if run_dir is not None:
        write_manifest(rows, run_dir / "manifest.csv", locations="none")
    return rows


def load_items(cfg: Config, rows: list[dict[str, str]], classes: list[str] | None = None,
               ids: list[str] | None = None) -> Items:
    """Crop every finding of the wanted classes; each series is loaded and preprocessed once.

    Args:
        cfg: run config (label/centre columns, transform preset).
        rows: manifest rows joined with findings.
        classes: keep only these classes (None: all labelled rows).
        ids: item id per row (default: series UID + lesion id).
    """
    from datasets.volume_io import load_volume

    col = cfg.data.label_column
    ids = ids or [_row_id(r, n) for n, r in enumerate(rows)]
    wanted = [(r, i) for r, i in zip(rows, ids, strict=True) if r.get(col) and (classes is None or r[col] in classes)]
    if not wanted:
        raise FewscanError(f"no manifest rows with a '{col}' label" + (f" in {classes}" if classes else ""))
    by_series: dict[str, list[tuple[dict[str, str], str]]] = defaultdict(list)
    for row, item_id in wanted:
        by_series[row["path"]].append((row, item_id))
    crops, labels, groups, out_ids = [], [], [], []
    for path, findings in progress(sorted(by_series.items()), desc="preparing series", unit="series", leave=False):
        volume = load_volume(Path(path))
        image = prepare(cfg.transforms, volume.meta.get("modality") or findings[0][0].get("modality"))(
            volume_to_dict(volume))["image"]
        for row, item_id in findings:
            try:
                centre = [float(row[c]) for c in cfg.data.center_columns]
            except (KeyError, ValueError):
                raise InputError(path, f"finding {row.get('lesion_id', '?')} has no numeric "
                                 f"{cfg.data.center_columns} centre") from None
            ras = lps_to_ras(centre) if cfg.data.center_frame == "LPS" else centre
            try:
                crops.append(crop_around(image, ras, cfg.transforms))
            except ValueError as err:
                raise InputError(path, str(err)) from None
            labels.append(row[col])
            groups.append(_row_group(row))
            out_ids.append(item_id)
    log.info("prepared %d items from %d series", len(crops), len(by_series))
    return Items(torch.stack(crops), labels, groups, out_ids)


# --- npz -------------------------------------------------------------------------------------------------------
class NpzSource:
    """MedMNIST-style `.npz` arrays (`data.root` is the file); 2D items `(M, C, H, W)` scaled to [0, 1]."""

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        from datasets.sources import load_npz

        self.cfg = cfg
        arrays = load_npz(Path(cfg.data.root), cfg.data.npz_parts)
        self.images = arrays.images
        self.classes = sorted(set(arrays.labels))
        self._catalog = Catalog(arrays.labels, _hash_groups(arrays.groups, "npz"), arrays.ids)

    def catalog(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Catalog:
        return _subset(self._catalog, _select(self._catalog, classes, groups))

    def items(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Items:
        idx = _select(self._catalog, classes, groups)
        images = self.images[idx]
        x = image_2d(images, self.cfg.transforms.image_size) if images.ndim == 4 else image_2d(images)
        cat = _subset(self._catalog, idx)
        return Items(x.contiguous(), cat.labels, cat.groups, cat.ids)


# --- folder ----------------------------------------------------------------------------------------------------
class FolderSource:
    """Class-per-folder tree `root/<class>/[<patient>/]<file>`: PNG/JPEG/TIFF images (2D items, [0, 1], resized
    to `transforms.image_size` when set) or NIfTI patches (3D: the volume preset, then centre crop/pad to
    `transforms.roi_size`)."""

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        from datasets.sources import is_nifti, scan_folder

        self.cfg = cfg
        self.entries = scan_folder(Path(cfg.data.root))
        kinds = {is_nifti(e.path) for e in self.entries}
        if len(kinds) > 1:
            raise InputError(cfg.data.root, "mixes 2D images and NIfTI volumes; use one kind per tree")
        self.volumes = kinds == {True}
        self.classes = sorted({e.label for e in self.entries})
        groups = _hash_groups([e.group for e in self.entries], "folder")
        # Patient folder names may be patient IDs: item ids (written into episode files) carry the key instead.
        ids = [e.case_id if e.group == e.case_id else "/".join([e.label, key, *Path(e.case_id).parts[2:]])
               for e, key in zip(self.entries, groups, strict=True)]
        self._catalog = Catalog([e.label for e in self.entries], groups, ids)

    def catalog(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Catalog:
        return _subset(self._catalog, _select(self._catalog, classes, groups))

    def items(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Items:
        idx = _select(self._catalog, classes, groups)
        xs = [self._load(self.entries[i].path) for i in progress(idx, desc="reading files", unit="file", leave=False)]
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            first = next(self.entries[i].path for i, x in zip(idx, xs, strict=True) if x.shape != xs[0].shape)
            raise InputError(first, f"item shape {tuple(xs[0].shape)} expected, found {sorted(shapes)}; "
                             "set transforms.image_size to resize 2D images")
        cat = _subset(self._catalog, idx)
        return Items(torch.stack(xs), cat.labels, cat.groups, cat.ids)

    def _load(self, path: Path) -> torch.Tensor:
        from datasets.sources import load_image, load_nifti

        if not self.volumes:
            return image_2d(load_image(path), self.cfg.transforms.image_size)
        t = self.cfg.transforms
        image = prepare(t, None)(volume_to_dict(load_nifti(path)))["image"]
        crop = fit_size(image, t.roi_size)
        if t.slice_axis != "none":
            from transforms.presets import SLICE_AXES, central_slice

            crop = central_slice(crop, SLICE_AXES[t.slice_axis])
        return crop


# --- decathlon -------------------------------------------------------------------------------------------------
class DecathlonSource:
    """A Decathlon folder as organ-patch classification: one crop per (case, named structure present), centred on
    the structure's centroid; the class is the structure name and the patient key the (hashed) case id."""

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        import nibabel as nib

        from datasets.sources import label_counts, read_decathlon

        self.cfg = cfg
        self.dataset = read_decathlon(Path(cfg.data.root))
        names = self.dataset.label_names
        wanted = set(cfg.data.structures) if cfg.data.structures else None
        if wanted and wanted - set(names.values()):
            raise FewscanError(f"data.structures not in the label table: {sorted(wanted - set(names.values()))}")
        self.cases = [c for c in self.dataset.cases if c.label is not None]
        labels, raw_groups, ids, self.targets = [], [], [], []
        for case in self.cases:
            counts = label_counts(np.asarray(nib.load(case.label).dataobj))
            for value, name in sorted(names.items()):
                if value == 0 or counts.get(value, 0) < cfg.data.min_voxels or (wanted and name not in wanted):
                    continue
                labels.append(name)
                raw_groups.append(case.case_id)
                ids.append(f"{case.case_id}#{name}")
                self.targets.append((case, value))
        if not labels:
            raise InputError(self.dataset.root, "no labelled structures in the training cases")
        self.classes = sorted(set(labels))
        self._catalog = Catalog(labels, _hash_groups(raw_groups, "decathlon"), ids)

    def catalog(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Catalog:
        return _subset(self._catalog, _select(self._catalog, classes, groups))

    def items(self, classes: Iterable[str] | None = None, groups: set[str] | None = None) -> Items:
        from datasets.sources import load_case

        idx = _select(self._catalog, classes, groups)
        by_case: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            by_case[self.targets[i][0].case_id].append(i)
        crops: dict[int, torch.Tensor] = {}
        for case_idx in progress(by_case.values(), desc="preparing cases", unit="case", leave=False):
            case = self.targets[case_idx[0]][0]
            image, label = load_case(self.dataset, case)
            prepared = prepare(self.cfg.transforms, self.dataset.primary_modality)(volume_to_dict(image, label))
            lab = prepared["label"]
            affine = np.asarray(lab.affine, dtype=float)
            for i in case_idx:
                voxels = np.argwhere(np.asarray(lab[0]) == self.targets[i][1])
                if len(voxels) == 0:  # a structure smaller than a voxel at the target spacing
                    raise InputError(case.label, f"structure {self._catalog.labels[i]!r} vanishes when resampled "
                                     f"to {self.cfg.transforms.spacing} mm; raise data.min_voxels")
                centre = (affine @ np.append(voxels.mean(axis=0), 1.0))[:3]
                crops[i] = crop_around(prepared["image"], centre, self.cfg.transforms)
        cat = _subset(self._catalog, idx)
        return Items(torch.stack([crops[i] for i in idx]), cat.labels, cat.groups, cat.ids)


SOURCES: dict[str, type] = {"tcia": TciaSource, "npz": NpzSource, "folder": FolderSource,
                            "decathlon": DecathlonSource}


def open_source(cfg: Config, run_dir: Path | None = None) -> TciaSource | NpzSource | FolderSource | DecathlonSource:
    """The classification source named by `cfg.data.source`; with `run_dir`, a TCIA manifest is saved there."""
    return SOURCES[cfg.data.source](cfg, run_dir)



