"""Index a folder tree (TCIA-style DICOM, NIfTI/NRRD/MHA, Decathlon) into a manifest: one row per series/volume.

Patient identity never leaves this module raw: rows carry ``patient_key``, a salted SHA-256 of PatientID
(salt from the ``salt`` argument, else env ``FEWSCAN_SALT``, else `DEFAULT_SALT`). Findings CSVs that key on
``patient_id`` are joined through the same hash. The default salt is public, so its keys are pseudonyms
against casual reading only: set ``FEWSCAN_SALT`` to a secret for real patient data.

Rows also carry ``series_key``, the same salted hash of the series' path relative to ``root``: TCIA folders are
named by PatientID, so `write_manifest` writes that key to disk and the paths to a locator beside it
(`datasets.manifest`).

Re-indexing is incremental: per-file header summaries are kept in a JSON cache beside the manifest and a file
with the same path, size and mtime is not re-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from datasets import dicom
from datasets.dicom_frames import Frame, frames_of, is_image
from datasets.dicom_geometry import plan_stacks
from datasets.guard import malformed
from datasets.manifest import columns, join_paths, read_manifest, write_manifest
from datasets.volume import InputError, atomic_path
from datasets.volume_io import VOLUME_SUFFIXES, load_volume, read_sidecar
from datasets.world import LPS_TO_RAS, sitk_ras_affine

__all__ = ["index_tree", "load_volume", "locate", "patient_key", "read_manifest", "write_manifest"]

log = logging.getLogger(__name__)

DEFAULT_SALT = "fewscan-public-salt-v1"
RAW_ID_COLUMNS = ("patient_id", "PatientID")
CACHE_VERSION = 1


def patient_key(patient_id: str, salt: str | None = None) -> str:
    """Salted SHA-256 of a patient ID, 16 hex characters; empty for an empty ID."""
    if not patient_id:
        return ""
    salt = salt if salt is not None else os.environ.get("FEWSCAN_SALT", DEFAULT_SALT)
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:16]


def is_volume_file(path: Path) -> bool:
    """NIfTI / NRRD / MetaImage by name."""
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES)


def summarise_file(path: Path, salt: str | None) -> dict[str, Any] | None:
    """Header summary of one file (JSON-safe), or None when it is neither DICOM nor a volume file."""
    if is_volume_file(path):
        return _summarise_volume(path)
    if path.name == "dataset.json" or path.suffix.lower() in {".json", ".csv", ".txt", ".md"}:
        return None
    ds = dicom.read_dataset(path, pixels=False)
    if ds is None:
        return None
    try:
        with malformed(path, "DICOM header"):
            summary = header_summary(ds, path)
            if summary is not None:
                summary["patient_key"] = patient_key(str(ds.get("PatientID", "")), salt)
    except InputError as err:  # one damaged file does not stop indexing the tree
        log.warning("skipping %s", err)
        return None
    return summary


def header_summary(ds: Dataset, path: Path) -> dict[str, Any] | None:
    """JSON-safe facts of one DICOM file: ids, kind (dicom/seg/rtstruct), frames or label links."""
    modality = str(ds.get("Modality", "")).upper()
    summary: dict[str, Any] = {
        "file": str(path), "modality": modality, "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")), "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "description": str(ds.get("SeriesDescription", "")).strip(), "labels_for": "", "label_names": {},
    }
    if modality in ("SEG", "RTSTRUCT"):
        from datasets.labels import label_links

        summary["kind"] = modality.lower()
        summary["labels_for"], summary["label_names"] = label_links(ds)
        return summary
    if not is_image(ds):
        log.debug("skipping %s: %s object", path, modality or "non-image")
        return None
    try:
        summary["frames"] = [f.to_json() for f in frames_of(ds, path)]
    except InputError as err:
        log.warning("skipping %s", err)
        return None
    summary["kind"] = "dicom"
    return summary


def _summarise_volume(path: Path) -> dict[str, Any] | None:
    try:
        img = nib.load(path) if not path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")) else None
    except Exception as err:  # nibabel raises many types for bad files
        log.warning("skipping %s: unreadable volume header (%s)", path, err)
        return None
    if img is None:
        return _summarise_itk(path)
    return _geometry_summary(path, tuple(int(s) for s in img.shape), img.affine)


def _summarise_itk(path: Path) -> dict[str, Any] | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        log.warning("skipping %s: unreadable volume header (%s)", path, str(err).splitlines()[0])
        return None
    shape = tuple(int(s) for s in reader.GetSize())
    affine = sitk_ras_affine(reader)
    return _geometry_summary(path, shape, affine)


def _geometry_summary(path: Path, shape: tuple[int, ...], affine) -> dict[str, Any]:
    sidecar = read_sidecar(path)
    return {
        "kind": "nifti",
        "file": str(path),
        "shape": canonical_order(shape[:3], affine) + list(shape[3:]),
        "spacing": canonical_order(np.linalg.norm(affine[:3, :3], axis=0), affine),
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "labels_for": str(sidecar.get("series_uid", "")),
        "label_names": sidecar.get("label_names") or {},
    }


def canonical_order(values, affine: np.ndarray) -> list[float]:
    """Per-axis ``values`` (shape, spacing) reordered as `canonical` reorders the array axes."""
    out = [0.0] * 3
    for axis, (target, _) in enumerate(nib.orientations.io_orientation(affine)):
        out[int(target)] = values[axis]
    return out


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _summaries(files: list[Path], salt: str | None, workers: int,
               cache_file: Path | None) -> tuple[list[dict], dict[str, Any]]:
    """Summaries for ``files``, re-reading only those whose (size, mtime) changed since the cache, and the cache
    to write once the index succeeds (`_save_cache`)."""
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("version") == CACHE_VERSION and data.get("salt") == patient_key("x", salt):
                cache = data.get("files", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            log.warning("ignoring unreadable index cache %s", cache_file)
    stamps = {str(f): _stamp(f) for f in files}
    todo = [f for f in files if cache.get(str(f), {}).get("stamp") != stamps[str(f)]]
    log.debug("index: %d files, %d cached, %d to read", len(files), len(files) - len(todo), len(todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            fresh = list(pool.map(summarise_file, todo, [salt] * len(todo), chunksize=16))
    else:
        fresh = [summarise_file(f, salt) for f in todo]
    for f, summary in zip(todo, fresh, strict=True):
        cache[str(f)] = {"stamp": stamps[str(f)], "summary": summary}
    cache = {k: v for k, v in cache.items() if k in stamps}
    return [cache[str(f)]["summary"] for f in files if cache[str(f)]["summary"] is not None], cache


def _save_cache(cache_file: Path | None, cache: dict[str, Any], salt: str | None) -> None:
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "salt": patient_key("x", salt), "files": cache}))


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _fmt(values: Iterable[float], digits: int = 4) -> str:
    return "x".join(f"{round(float(v), digits):g}" for v in values)


def _series_rows(summaries: list[dict]) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """Rows for all summaries, plus maps SOP UID -> series UID and series UID -> patient key."""
    by_series: dict[str, list[dict]] = {}
    rows: list[dict[str, str]] = []
    for s in summaries:
        if s["kind"] == "nifti":
            rows.append({
                "path": s["file"], "kind": "nifti", "shape": _fmt(s["shape"], 0), "spacing": _fmt(s["spacing"]),
                "orientation": s["orientation"], "n_files": "1", "labels_for": s["labels_for"],
                "label_names": _names(s["label_names"]),
            })
        elif s["kind"] in ("seg", "rtstruct"):
            rows.append({**_ids(s), "path": s["file"], "kind": s["kind"], "n_files": "1",
                         "labels_for": s["labels_for"], "label_names": _names(s["label_names"])})
        else:
            by_series.setdefault(s["series_uid"], []).append(s)
    sop_to_series: dict[str, str] = {}
    for uid, items in by_series.items():
        for s in items:
            sop_to_series[s["sop_uid"]] = uid
        rows.extend(_image_rows(uid, items))
    return rows, sop_to_series, {uid: items[0]["patient_key"] for uid, items in by_series.items()}


def _ids(s: dict) -> dict[str, str]:
    return {k: s[k] for k in ("modality", "series_uid", "study_uid", "patient_key", "description")}


def _names(names: dict) -> str:
    return json.dumps({str(k): v for k, v in names.items()}, sort_keys=True) if names else ""


def _image_rows(uid: str, items: list[dict]) -> list[dict[str, str]]:
    """One row per stack of an image series (usually one), with its geometry as `load_series` returns it."""
    files = sorted(s["file"] for s in items)
    path = files[0] if len(files) == 1 else os.path.commonpath(files)
    base = {**_ids(items[0]), "path": path, "kind": "dicom"}
    frames = [Frame.from_json(f) for s in items for f in s["frames"]]
    try:
        stacks = plan_stacks(frames, Path(path))
    except InputError as err:
        return [{**base, "n_files": str(len(files)), "issues": err.reason}]
    rows = []
    for i, stack in enumerate(stacks):
        affine = LPS_TO_RAS @ stack.affine_lps()
        rows.append({
            **base,
            "shape": _fmt(canonical_order(stack.shape[:3], affine) + list(stack.shape[3:]), 0),
            "spacing": _fmt(canonical_order(np.linalg.norm(affine[:3, :3], axis=0), affine)),
            "orientation": "".join(nib.orientations.aff2axcodes(affine)),
            "n_files": str(len({f.file for col in stack.grid for f in col})),
            "stack": str(i) if len(stacks) > 1 else "",
            "issues": "; ".join(stack.issues),
        })
    return rows


def _link_labels(rows: list[dict[str, str]]) -> None:
    """NIfTI label maps named ``<series_uid>.nii.gz`` link to that series when no sidecar said so."""
    uids = {r["series_uid"] for r in rows if r["kind"] == "dicom"}
    for r in rows:
        if r["kind"] == "nifti" and not r.get("labels_for"):
            stem = Path(r["path"]).name.split(".nii")[0]
            if stem in uids:
                r["labels_for"] = stem


def _decathlon(root: Path, rows: list[dict[str, str]]) -> None:
    """Apply every ``dataset.json`` (Medical Segmentation Decathlon) under root: split, modality, links."""
    by_path = {str(Path(r["path"]).resolve()): r for r in rows}
    for spec_file in sorted(root.rglob("dataset.json")):
        try:
            spec = json.loads(spec_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(spec_file, f"invalid dataset.json: {err}") from err
        modality = "/".join(str(v) for v in (spec.get("modality") or {}).values())
        names = json.dumps({str(k): v for k, v in (spec.get("labels") or {}).items()}, sort_keys=True)
        entries = [(e, "train") for e in spec.get("training", [])]
        entries += [({"image": e} if isinstance(e, str) else e, "test") for e in spec.get("test", [])]
        for entry, split in entries:
            image = by_path.get(str((spec_file.parent / entry["image"]).resolve()))
            if image is None:
                continue
            image.update(split=split, modality=image.get("modality") or modality)
            label = by_path.get(str((spec_file.parent / entry["label"]).resolve())) if entry.get("label") else None
            if label is not None:
                label.update(split=split, labels_for=image["series_key"], label_names=names)


def index_tree(
    root: Path,
    labels: Path | None = None,
    *,
    workers: int = 0,
    salt: str | None = None,
    raw_ids: bool = False,
    cache: Path | None = None,
) -> list[dict[str, str]]:
    """Index ``root`` into manifest rows (all values strings).

    Args:
        root: folder tree with DICOM series (any layout, e.g. TCIA Collection/Patient/Study/Series), NIfTI/
            NRRD/MHA volumes and optional Decathlon ``dataset.json``.
        labels: findings CSV joined onto series rows by ``series_uid``, else ``sop_uid``/``SOPInstanceUID``,
            else ``patient_id`` (through the salted hash); one manifest row per finding.
        workers: header-reading processes (0 or 1: in this process).
        salt: patient-key salt (default env FEWSCAN_SALT, else `DEFAULT_SALT`).
        raw_ids: keep raw patient-ID columns of the findings CSV (off by default).
        cache: JSON header cache making re-indexing incremental (None: no cache).

    Returns:
        Rows with at least `SERIES_COLUMNS`; ``shape``/``spacing`` are in RAS (canonical) axis order as the
        loaders return them, ``orientation`` is the stored (source) orientation.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    summaries, cached = _summaries(_walk(root), salt, workers, cache)
    rows, sop_to_series, series_patient = _series_rows(summaries)
    if not rows:
        raise InputError(root, "no DICOM series or volume files found")
    for r in rows:  # the on-disk name of a series: its path relative to root says the patient's folder name
        r["series_key"] = patient_key(os.path.relpath(r["path"], root), salt)
    _link_labels(rows)
    _decathlon(root, rows)
    rows.sort(key=lambda r: (r["kind"] != "dicom", r.get("patient_key", ""), r.get("study_uid", ""), r["path"],
                             r.get("series_uid", "")))
    if labels is not None:
        rows = join_findings(rows, labels, sop_to_series, series_patient, salt=salt, raw_ids=raw_ids)
    _save_cache(cache, cached, salt)  # only now: a refused index leaves nothing beside its output
    return [{c: str(r.get(c, "")) for c in columns(rows)} for r in rows]


def join_findings(
    rows: list[dict[str, str]],
    labels: Path,
    sop_to_series: dict[str, str],
    series_patient: dict[str, str],
    *,
    salt: str | None = None,
    raw_ids: bool = False,
) -> list[dict[str, str]]:
    """One row per (finding, series) for image series with findings; others keep one row."""
    findings = read_manifest(labels)
    by_series: dict[str, list[dict[str, str]]] = {}
    unmatched = 0
    for f in findings:
        targets = _finding_targets(f, sop_to_series, series_patient, salt)
        unmatched += not targets
        extra = {k: v for k, v in f.items() if raw_ids or k not in RAW_ID_COLUMNS}
        raw = next((f[c] for c in RAW_ID_COLUMNS if f.get(c)), "")
        if raw and not raw_ids:  # e.g. lesion_id "PAT-0042-L1": the ID inside another column, pseudonymised too
            extra = {k: v.replace(raw, patient_key(raw, salt)) if isinstance(v, str) else v for k, v in extra.items()}
        for uid in targets:
            by_series.setdefault(uid, []).append(extra)
    if unmatched:
        log.warning("%s: %d of %d findings match no indexed series", labels, unmatched, len(findings))
    out: list[dict[str, str]] = []
    for r in rows:
        matched = by_series.get(r["series_uid"], []) if r["kind"] == "dicom" and r.get("series_uid") else []
        out.extend([{**f, **r} for f in matched] or [r])
    return out


def _finding_targets(f: dict[str, str], sop_to_series: dict, series_patient: dict, salt: str | None) -> list[str]:
    if f.get("series_uid"):
        return [f["series_uid"]] if f["series_uid"] in series_patient else []
    sop = f.get("sop_uid") or f.get("SOPInstanceUID")
    if sop:
        return [sop_to_series[sop]] if sop in sop_to_series else []
    pid = f.get("patient_id") or f.get("PatientID")
    if pid:
        key = patient_key(pid, salt)
        return [uid for uid, k in series_patient.items() if k == key]
    return []


def locate(rows: list[dict[str, str]], manifest: Path, root: Path | None) -> list[dict[str, str]]:
    """Give every row its ``path``: rows that lack one are found by ``series_key`` in a fresh index of `root`.

    Raises:
        InputError: naming `manifest`, when `root` is missing or a series is no longer under it (moved,
            deleted, or indexed under another ``FEWSCAN_SALT``).
    """
    if all(r.get("path") for r in rows):
        return rows
    if root is None or not Path(root).is_dir():
        raise InputError(manifest, "names its series by series_key only, and data.root "
                         f"({root or 'not set'}) is not a folder to find them in")
    return join_paths(rows, {r["series_key"]: r["path"] for r in index_tree(Path(root))}, manifest, f"{root}")
