"""Loaders for the non-DICOM sources: npz arrays, class-per-folder images/volumes, Decathlon folders, label maps.

Everything here turns files into arrays or `Volume`s and names; nothing is resampled or normalised (that is
`transforms/`). Bad files raise `InputError` naming the file and the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datasets.guard import check_size, check_stored, malformed
from datasets.volume import InputError, Volume

NPZ_PARTS = ("train", "val", "test")  # MedMNIST's keys: `<part>_images`, `<part>_labels`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class ArraySet:
    """Labelled images from one file or folder.

    Attributes:
        images: `(M, C, H, W)` for 2D or `(M, C, I, J, K)` for 3D, the file's dtype.
        labels: class name per image, length M.
        groups: raw group (patient/source) key per image, length M; the image's own id when the file has none.
        ids: stable id per image (e.g. `train#17`), length M.
    """

    images: np.ndarray
    labels: list[str]
    groups: list[str]
    ids: list[str]


def _class_names(npz: Any, path: Path) -> list[str] | None:
    if "class_names" not in npz.files:
        return None
    return [str(n) for n in np.asarray(npz["class_names"]).ravel()]


def _label_strings(raw: np.ndarray, names: list[str] | None, path: Path) -> list[str]:
    """Integer or string labels `(M,)` / `(M, 1)` to names; multi-label arrays are refused."""
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise InputError(path, f"labels of shape {raw.shape}: only single-label classification is supported")
    if raw.dtype.kind in "US":
        return [str(v) for v in raw]
    if raw.dtype.kind not in "iub":
        raise InputError(path, f"labels must be integers or strings, not {raw.dtype}")
    if names is None:
        return [str(int(v)) for v in raw]
    if raw.min() < 0 or raw.max() >= len(names):
        raise InputError(path, f"label values {int(raw.min())}..{int(raw.max())} do not index {len(names)} class_names")
    return [names[int(v)] for v in raw]


def channels_first(images: np.ndarray, path: Path) -> np.ndarray:
    """Stacked images to `(M, C, *spatial)`.

    `(M, H, W)` is grey 2D; `(M, H, W, C)` with C in 1, 3, 4 is channels-last 2D (MedMNIST RGB);
    `(M, I, J, K)` otherwise is grey 3D (MedMNIST 3D); `(M, C, ...)` with 5 axes is taken as given.
    """
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] > 4:
        return np.moveaxis(images, -1, 1)
    if images.ndim == 4:
        return images[:, None]
    if images.ndim == 5:
        return images
    raise InputError(path, f"images of shape {images.shape}: expected (M, H, W[, C]) or (M, I, J, K)")


def check_npz(npz: Any, path: Path) -> None:
    """Read every member's npy header (shape, dtype) and refuse object arrays, a total above the memory limit, or a
    member that declares far more bytes than it stores, before any array is inflated."""
    total = 0
    for name in npz.files:
        info = npz.zip.getinfo(f"{name}.npy")
        with npz.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        if dtype.hasobject:
            raise InputError(path, f"array {name!r} holds Python objects (dtype {dtype}); save plain numeric or "
                             "string arrays")
        declared = math.prod(shape) * dtype.itemsize
        check_stored(path, declared, info.compress_size, info.compress_type != 0, f"array {name!r}")
        total += declared
    check_size(path, (total,), 1, "set of arrays")


def load_npz(path: Path, parts: Iterable[str] | None = None) -> ArraySet:
    """Read a MedMNIST-style npz (`train_images`, `train_labels`, `val_*`, `test_*`) or one with `images`,
    `labels`, optional `class_names` and `groups` (patient or source keys for patient-disjoint splits).

    Args:
        path: the .npz file.
        parts: MedMNIST parts to pool (default all present); ignored for `images`/`labels` files.
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read npz: {err}") from None
    with npz, malformed(path, "npz file"):
        check_npz(npz, path)
        names = _class_names(npz, path)
        if "images" in npz.files:
            if "labels" not in npz.files:
                raise InputError(path, "has 'images' but no 'labels' array")
            blocks = [("", npz["images"], npz["labels"], npz["groups"] if "groups" in npz.files else None)]
        else:
            wanted = list(parts) if parts is not None else [p for p in NPZ_PARTS if f"{p}_images" in npz.files]
            missing = [p for p in wanted if f"{p}_images" not in npz.files or f"{p}_labels" not in npz.files]
            if missing or not wanted:
                raise InputError(path, f"no '<part>_images'/'<part>_labels' arrays for parts {missing or wanted}; "
                                 f"arrays present: {sorted(npz.files)}")
            blocks = [(f"{p}", npz[f"{p}_images"], npz[f"{p}_labels"],
                       npz[f"{p}_groups"] if f"{p}_groups" in npz.files else None) for p in wanted]
        images, labels, groups, ids = [], [], [], []
        for part, imgs, labs, grps in blocks:
            if len(imgs) != len(labs) or (grps is not None and len(grps) != len(imgs)):
                raise InputError(path, f"{part or 'images'}: {len(imgs)} images but {len(labs)} labels"
                                 + (f" and {len(grps)} groups" if grps is not None else ""))
            prefix = f"{part}#" if part else "#"
            part_ids = [f"{prefix}{i}" for i in range(len(imgs))]
            images.append(channels_first(np.asarray(imgs), path))
            labels += _label_strings(labs, names, path)
            groups += [str(g) for g in np.asarray(grps).ravel()] if grps is not None else part_ids
            ids += part_ids
    shapes = {a.shape[1:] for a in images}
    if len(shapes) > 1:
        raise InputError(path, f"parts have different image shapes {sorted(shapes)}")
    return ArraySet(np.concatenate(images), labels, groups, ids)


def load_image(path: Path) -> np.ndarray:
    """A PNG/JPEG/TIFF/BMP file as `(C, H, W)`: C = 1 for grey (kept 8 or 16 bit), 3 for colour (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "P", "LA", "CMYK", "YCbCr"):
                img = img.convert("RGB" if img.mode != "LA" else "L")
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(path, f"cannot read image: {err}") from None
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def load_nifti(path: Path) -> Volume:
    """A NIfTI file as a canonical (closest RAS+) float32 `Volume` `(I, J, K[, T])`, scaling applied."""
    from datasets.volume_io import load_nifti as read

    vol = read(Path(path))
    array = np.asarray(vol.array, dtype=np.float32)
    return Volume(array[..., None] if array.ndim == 2 else array, vol.affine, {**vol.meta, "source_file": path.name})


@dataclass
class FolderEntry:
    """One file of a class-per-folder tree: `root/<class>/[<group>/]<file>`."""

    path: Path
    label: str
    group: str
    case_id: str  # path relative to root


def scan_folder(root: Path) -> list[FolderEntry]:
    """Files of a class-per-folder tree; a sub-folder under a class folder is a group (patient), else each file
    is its own group. Hidden files and non-image files are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "data.root is not a folder")
    entries = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            name = file.name.lower()
            if file.name.startswith(".") or not file.is_file() or not name.endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES):
                continue
            rel = file.relative_to(root)
            group = rel.parts[1] if len(rel.parts) > 2 else str(rel)
            entries.append(FolderEntry(file, class_dir.name, group, str(rel)))
    if not entries:
        raise InputError(root, "no class folders with PNG/JPEG/TIFF or NIfTI files (expected root/<class>/<file>)")
    return entries


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


# --- label maps and Decathlon --------------------------------------------------------------------------------
def parse_label_names(table: dict[str, Any], path: Path) -> dict[int, str]:
    """`{"1": "liver"}` (Decathlon, TotalSegmentator) or `{"liver": 1}` (nnU-Net v2) to `{1: "liver"}`."""
    out: dict[int, str] = {}
    for key, value in table.items():
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[int(value)] = str(key)
            else:
                out[int(key)] = str(value)
        except (TypeError, ValueError):
            raise InputError(path, f"label table entry {key!r}: {value!r} is not 'value: name'") from None
    return dict(sorted(out.items()))


def read_label_names(path: Path, key: str | None = None) -> dict[int, str]:
    """A JSON label-name table; `key` picks a sub-table (TotalSegmentator `class_map_total.json`: `total`,
    `total_mr`; Decathlon `dataset.json`: `labels`, the default when present)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read label table: {err}") from None
    if key is None and isinstance(data, dict) and isinstance(data.get("labels"), dict):
        key = "labels"
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), dict):
            raise InputError(path, f"no label table {key!r} (keys: {sorted(data) if isinstance(data, dict) else []})")
        data = data[key]
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise InputError(path, f"several label tables, pick one of {sorted(data)}" if isinstance(data, dict)
                         else "label table must be a JSON object")
    return parse_label_names(data, path)


def load_label_map(path: Path, names: dict[int, str] | None = None) -> Volume:
    """A label-map NIfTI as a canonical integer `Volume` with `meta["label_names"]`."""
    vol = load_nifti(Path(path))
    rounded = np.rint(vol.array)
    if not np.allclose(rounded, vol.array, atol=1e-3):
        raise InputError(path, "label map has non-integer values")
    return Volume(rounded.astype(np.int32), vol.affine, {**vol.meta, "label_names": dict(names or {})})


@dataclass(frozen=True)
class StructureTask:
    """One structure of a label map, a task of its own (e.g. one organ to segment or classify)."""

    value: int
    name: str


def structure_tasks(label_names: dict[int, str], present: Iterable[int] | None = None) -> list[StructureTask]:
    """One task per named structure (background 0 excluded), optionally only those `present` in the data."""
    keep = None if present is None else {int(v) for v in present}
    return [StructureTask(v, n) for v, n in sorted(label_names.items())
            if v != 0 and (keep is None or v in keep)]


def label_counts(array: np.ndarray) -> dict[int, int]:
    """Voxel count per non-zero label value of an integer label array."""
    values, counts = np.unique(np.asarray(array), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}


def structure_centre(label: Volume, value: int) -> np.ndarray:
    """World (RAS mm) centroid `(3,)` of the voxels labelled `value`."""
    idx = np.argwhere(np.asarray(label.array) == value)
    if len(idx) == 0:
        raise ValueError(f"label {value} is absent")
    return (label.affine @ np.append(idx.mean(axis=0)[:3], 1.0))[:3]


@dataclass
class DecathlonCase:
    """One entry of a Decathlon `dataset.json`."""

    case_id: str  # image file name without suffix, e.g. `liver_3`
    image: Path
    label: Path | None
    split: str  # train | test


@dataclass
class DecathlonSet:
    """A Medical Segmentation Decathlon folder: `dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`."""

    root: Path
    name: str
    modality: dict[str, str]
    label_names: dict[int, str]
    cases: list[DecathlonCase] = field(default_factory=list)

    @property
    def primary_modality(self) -> str:
        """The first channel's modality, e.g. `CT` or `MRI`."""
        return next(iter(self.modality.values()), "")


def read_decathlon(root: Path) -> DecathlonSet:
    """Parse `root/dataset.json`; entries whose image file is missing are an error naming the file."""
    root = Path(root)
    spec_file = root / "dataset.json"
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(spec_file, f"cannot read Decathlon dataset.json: {err}") from None
    if not isinstance(spec, dict) or "training" not in spec:
        raise InputError(spec_file, "not a Decathlon dataset.json (no 'training' list)")
    names = parse_label_names(spec.get("labels") or {}, spec_file)
    entries = [(e, "train") for e in spec.get("training") or []]
    entries += [({"image": e} if isinstance(e, str) else e, "test") for e in spec.get("test") or []]
    cases = []
    for entry, split in entries:
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(spec_file, f"entry {entry!r} has no 'image'")
        image = (root / entry["image"]).resolve()
        if not image.is_file():
            raise InputError(image, "listed in dataset.json but missing")
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        if label is not None and not label.is_file():
            raise InputError(label, "listed in dataset.json but missing")
        case_id = image.name.split(".nii")[0]
        cases.append(DecathlonCase(case_id, image, label, split))
    modality = {str(k): str(v) for k, v in (spec.get("modality") or {}).items()}
    return DecathlonSet(root, str(spec.get("name", root.name)), modality, names, cases)


def load_case(dataset: DecathlonSet, case: DecathlonCase) -> tuple[Volume, Volume | None]:
    """Image (`(I, J, K)` or `(I, J, K, C)` for multi-channel) and label map (with `label_names`) of one case."""
    image = load_nifti(case.image)
    image.meta["modality"] = dataset.primary_modality
    label = load_label_map(case.label, dataset.label_names) if case.label is not None else None
    if label is not None and label.array.shape[:3] != image.array.shape[:3]:
        raise InputError(case.label, f"label shape {label.array.shape[:3]} != image shape {image.array.shape[:3]}")
    return image, label
