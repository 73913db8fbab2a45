"""Manifest CSVs on disk: pseudonymised, with the file locations kept apart.

TCIA-style trees name their folders by PatientID, so a file path is a patient identifier. Index rows hold it
in ``path`` in memory, but a manifest written to disk names each series by ``series_key`` (a salted hash of its
path relative to the indexed root) instead. The paths go to a *locator* beside it, ``<name>.paths.csv``
(``series_key,path``): the one file that links the pseudonymised manifest to the data, to be kept with the data
like the index cache. A run folder's copy of the manifest has no locator at all; its series are found again by
indexing ``data.root`` (`datasets.index.locate`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from datasets.volume import InputError, atomic_path

__all__ = ["SERIES_COLUMNS", "columns", "join_paths", "locator_of", "read_manifest", "write_manifest"]

SERIES_COLUMNS = ["path", "series_key", "kind", "modality", "series_uid", "study_uid", "patient_key", "shape",
                  "spacing", "orientation", "n_files", "labels_for", "label_names", "description", "stack", "issues"]
Locations = Literal["beside", "none", "inline"]


def locator_of(manifest: Path) -> Path:
    """The locator file of a manifest: ``m.csv`` -> ``m.paths.csv``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name.removesuffix(".csv") + ".paths.csv")


def columns(rows: list[dict[str, str]]) -> list[str]:
    """`SERIES_COLUMNS`, then every other key of `rows` in first-seen order."""
    cols = list(SERIES_COLUMNS)
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def write_manifest(rows: list[dict[str, str]], out: Path, locations: Locations = "beside") -> None:
    """Write rows as CSV (header = union of keys, first-seen order); all-or-nothing.

    Args:
        rows: manifest rows; those of `index_tree` carry ``path`` and ``series_key``.
        out: CSV to write.
        locations: where the ``path`` column goes when every row has a ``series_key``: ``"beside"`` into
            `locator_of(out)`, ``"none"`` nowhere (a run folder's copy), ``"inline"`` stays in `out` (the user
            asked for raw identifiers). Rows without ``series_key`` are always written as they are.
    """
    cols = columns(rows)
    keyed = bool(rows) and all(r.get("series_key") for r in rows)
    if keyed and locations != "inline":
        cols.remove("path")
        if locations == "beside":
            where = {r["series_key"]: r["path"] for r in rows}
            _write_csv([{"series_key": k, "path": p} for k, p in where.items()], ["series_key", "path"],
                       locator_of(out))
    rows = [{k: v for k, v in r.items() if k in cols} for r in rows]
    _write_csv(rows, cols, out)


def _write_csv(rows: list[dict[str, str]], cols: list[str], out: Path) -> None:
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Read a manifest (or any CSV with a header) as a list of string dicts; a manifest's locator, when it is
    beside it, puts each row's ``path`` back."""
    rows = _read_csv(path)
    locator = locator_of(path)
    if rows and "path" not in rows[0] and "series_key" in rows[0] and locator.is_file():
        rows = join_paths(rows, {r["series_key"]: r["path"] for r in _read_csv(locator)}, path,
                     f"its locator {locator.name}")
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, f"cannot read CSV: {err}") from err


def join_paths(rows: list[dict[str, str]], where: dict[str, str], manifest: Path,
               source: str) -> list[dict[str, str]]:
    """Rows with their ``path`` from `where` (series_key -> path) where they lack one.

    Raises:
        InputError: naming `manifest` and `source` when a series_key is not in `where`.
    """
    missing = sum(not r.get("path") and r.get("series_key") not in where for r in rows)
    if missing:
        raise InputError(manifest, f"{missing} of its {len(rows)} rows name a series_key not found in {source}: "
                         "files moved or deleted since indexing, or another FEWSCAN_SALT")
    return [{"path": r.get("path") or where[r["series_key"]], **{k: v for k, v in r.items() if k != "path"}}
            for r in rows]
