"""Manifest rows -> a labelled stack of crops (the items episodes are drawn from)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.volume import FewscanError, InputError
from pipeline.config import Config
from transforms.presets import crop_around, lps_to_ras, prepare, volume_to_dict

log = logging.getLogger(__name__)


@dataclass
class Items:
    """Labelled examples for episodic sampling.

    Attributes:
        x: crops of shape `(M, 1, *roi)`.
        labels: class name per item, length M.
        groups: pseudonymised patient key per item, length M (episodes keep patients apart).
        ids: a stable, non-identifying id per item (series UID + finding id), length M.
    """

    x: torch.Tensor
    labels: list[str]
    groups: list[str]
    ids: list[str]


class TciaSource:
    """Findings of a TCIA-style tree (via its manifest): lazily cropped into `Items` per class subset.

    Every classification source offers the same two things: `classes` (all labelled class names) and
    `items(classes)` (the examples of those classes, preprocessed).
    """

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.rows = manifest_rows(cfg, run_dir)
        col = cfg.data.label_column
        self.classes = sorted({r[col] for r in self.rows if r.get(col)})

    def items(self, classes: list[str] | None = None) -> Items:
        """Preprocessed examples of `classes` (all when None)."""
        return load_items(self.cfg, self.rows, classes)


SOURCES: dict[str, type] = {"tcia": TciaSource}


def open_source(cfg: Config, run_dir: Path | None = None) -> TciaSource:
    """The classification source named by `cfg.data.source`; with `run_dir`, its manifest is saved there."""
    return SOURCES[cfg.data.source](cfg, run_dir)


def manifest_rows(cfg: Config, run_dir: Path | None = None) -> list[dict[str, str]]:
    """The manifest named in the config, or a fresh index of `data.root` (written into `run_dir`)."""
    from datasets.index import index_tree, read_manifest, write_manifest

    if cfg.data.manifest:
        return read_manifest(Path(cfg.data.manifest))
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise InputError(root, "data.root is not a folder")
    labels = root / cfg.data.labels if cfg.data.labels else None
    if labels is not None and not labels.is_file():
        raise InputError(labels, "findings CSV named by data.labels not found")
    rows = index_tree(root, labels=labels)
    if run_dir is not None:
        write_manifest(rows, run_dir / "manifest.csv")
    return rows


def load_items(cfg: Config, rows: list[dict[str, str]], classes: list[str] | None = None) -> Items:
    """Crop every finding of the wanted classes; each series is loaded and resampled once.

    Args:
        cfg: run config (label/centre columns, transform preset).
        rows: manifest rows joined with findings.
        classes: keep only these classes (None: all labelled rows).
    """
    from datasets.dicom import load_series

    col = cfg.data.label_column
    wanted = [r for r in rows if r.get(col) and (classes is None or r[col] in classes)]
    if not wanted:
        raise FewscanError(f"no manifest rows with a '{col}' label" + (f" in {classes}" if classes else ""))
    by_series: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in wanted:
        by_series[row["path"]].append(row)
    prep = prepare(cfg.transforms)
    crops, labels, groups, ids = [], [], [], []
    for path, findings in tqdm(sorted(by_series.items()), desc="preparing series", unit="series", leave=False):
        image = prep(volume_to_dict(load_series(Path(path))))["image"]
        for row in findings:
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
            groups.append(row.get("patient_key", path))
            ids.append(f"{row.get('series_uid', path)}#{row.get('lesion_id', len(ids))}")
    log.info("prepared %d items from %d series", len(crops), len(by_series))
    return Items(torch.stack(crops), labels, groups, ids)
