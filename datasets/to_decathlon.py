"""A TCIA-style tree with label objects -> a Medical Segmentation Decathlon training folder.

Every image series that a label object refers to (a DICOM-SEG, an RTSTRUCT, or a NIfTI label map linked by its
sidecar or name, as `index` links them) becomes one training case: `imagesTr/<case>.nii.gz` and
`labelsTr/<case>.nii.gz` on the image's grid, with one label table for the whole folder in `dataset.json` (the
union of the structure names, numbered in sorted order). Case names are `<patient_key>_<n>`: the salted patient
hash (`datasets.index.patient_key`), never a patient ID, so several series of one patient stay recognisable as one
patient (`registration.patient_regex: "^([0-9a-f]+)_"`).

The folder is written under a temporary name beside `out` and renamed at the end: a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from datasets.index import index_tree
from datasets.volume import FewscanError, InputError, Volume
from datasets.volume_io import write_nifti


def labelled_series(rows: list[dict[str, str]]) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(image row, label row) of every DICOM image series a label object refers to, in manifest order."""
    images = {r["series_uid"]: r for r in rows if r["kind"] == "dicom" and r.get("series_uid")}
    by_key = {r["series_key"]: r for r in rows if r["kind"] == "dicom"}
    out = []
    for r in rows:
        if r["kind"] not in ("seg", "rtstruct", "nifti") or not r.get("labels_for"):
            continue
        image = images.get(r["labels_for"]) or by_key.get(r["labels_for"])
        if image is not None:
            out.append((image, r))
    return out


def _names(label: Volume) -> dict[int, str]:
    """Label value -> structure name of a loaded label map (the value itself when unnamed)."""
    table = {int(k): str(v) for k, v in (label.meta.get("label_names") or {}).items() if str(v)}
    values = [int(v) for v in np.unique(np.asarray(label.array)) if v != 0]
    return {v: table.get(v, str(v)) for v in values}


def tree_to_decathlon(root: Path, out: Path, salt: str | None = None, workers: int = 0) -> dict[str, Any]:
    """Write the Decathlon folder `out` from the labelled series under `root`; returns its `dataset.json`.

    Raises:
        InputError: `root` has no label object referring to an image series; a label object that cannot be read
            or aligned (named).
        FewscanError: `out` exists.
    """
    from datasets.dicom import load_series
    from datasets.labels import load_labels

    root, out = Path(root), Path(out)
    if out.exists():
        raise FewscanError(f"{out}: already exists; choose a new folder")
    pairs = labelled_series(index_tree(root, workers=workers, salt=salt))
    if not pairs:
        raise InputError(root, "no label object (DICOM-SEG, RTSTRUCT or linked NIfTI label map) refers to an image "
                         "series here")
    loaded = []
    for image_row, label_row in pairs:
        image = load_series(Path(image_row["path"]), image_row["series_uid"])
        label = load_labels(Path(label_row["path"]), reference=Path(image_row["path"]), image=image,
                            mismatch="resample")
        array = np.asarray(label.array)
        if array.ndim == 4:  # one channel per segment: a label map, the later segment winning overlaps
            names = {n + 1: str((label.meta.get("label_names") or {}).get(str(n + 1), n + 1))
                     for n in range(array.shape[-1])}
            flat = np.zeros(array.shape[:3], np.int16)
            for n in range(array.shape[-1]):
                flat[array[..., n] > 0] = n + 1
            label = Volume(flat, label.affine, {**label.meta, "label_names": names})
        loaded.append((image_row, image, label, _names(label)))
    table = {name: i + 1 for i, name in enumerate(sorted({n for *_, names in loaded for n in names.values()}))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training, count = [], {}
        for image_row, image, label, names in loaded:
            key = image_row["patient_key"]
            count[key] = count.get(key, 0) + 1
            case = f"{key}_{count[key]}"
            remapped = np.zeros(np.asarray(label.array).shape, np.uint8 if len(table) < 255 else np.int16)
            for value, name in names.items():
                remapped[np.asarray(label.array) == value] = table[name]
            write_nifti(Volume(np.asarray(image.array), image.affine), tmp / "imagesTr" / f"{case}.nii.gz")
            write_nifti(Volume(remapped, image.affine), tmp / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        modalities = sorted({r["modality"] for r, *_ in loaded if r.get("modality")})
        spec = {"name": out.name, "description": "written by fewscan from a labelled DICOM tree",
                "modality": {"0": "/".join(modalities) or "unknown"},
                "labels": {"0": "background", **{str(v): n for n, v in table.items()}},
                "numTraining": len(training), "numTest": 0, "training": training, "test": []}
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec
