"""DICOM series -> `Volume`: find files, group by series, split into stacks, order, scale, RAS+ affine.

Geometry follows the DICOM standard (PS3.3 C.7.6.2.1.1): the world position of pixel (row r, column c) is
``IPP + c * PixelSpacing[1] * X + r * PixelSpacing[0] * Y`` in LPS mm, with ``X, Y`` the two halves of
ImageOrientationPatient. Arrays are assembled as ``(column, row, slice[, volume])`` so that voxel index
``(i, j, k)`` maps through a plain 4x4 affine; LPS becomes RAS+ by negating the first two world axes, and
`canonical` then reorders the axes to the closest RAS+ (the stored orientation is kept in the meta).

Handled: single-frame series (any transfer syntax pydicom's installed plugins decode), Siemens mosaics,
enhanced multi-frame (per-frame functional groups), multi-volume series (-> 4D), and series mixing
orientations/sizes/echoes/image types (-> several stacks). Non-DICOM and non-image files are skipped.

The loaders (`load_series`, `load_stacks`) read plain native little-endian files with `datasets.dicom_fast`
(one read per file, only the attributes used, pixels straight from the file bytes): pydicom's full parse was
most of a cold load. Every other file, and `read_series` for callers that need real datasets, goes to pydicom.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from datasets.dicom_fast import Header, read_header
from datasets.dicom_frames import Frame, frames_of, is_image
from datasets.dicom_geometry import Stack, plan_stacks, regularise
from datasets.guard import malformed
from datasets.volume import InputError, Volume, canonical
from datasets.world import LPS_TO_RAS

log = logging.getLogger(__name__)

Parsed = Dataset | Header  # what a series' files are read into (see `read_series`)

SKIP_SUFFIXES = {".txt", ".md", ".json", ".csv", ".xml", ".nii", ".gz", ".nrrd", ".mha", ".mhd", ".png", ".jpg",
                 ".py", ".zip", ".pdf"}


def list_files(path: Path | Sequence[Path]) -> list[Path]:
    """Every regular file under ``path`` (recursively, hidden files excluded), or the given files, sorted."""
    if isinstance(path, str | os.PathLike):
        path = Path(path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise InputError(path, "no such file or folder")
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in SKIP_SUFFIXES)
    return sorted(Path(p) for p in path)


def read_dataset(path: Path, *, pixels: bool = True) -> Dataset | None:
    """Parse one file with pydicom; ``None`` (logged at debug level) when it is not DICOM."""
    # the last three: an unknown VR or odd-length value in a damaged file's meta header, read eagerly
    errors = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError,
              NotImplementedError, BytesLengthException, struct.error)
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        pass  # no preamble/'DICM': old files; accept a forced read only if it looks like a DICOM object
    except errors as err:
        log.debug("skipping %s: not readable as DICOM (%s)", path, err)
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        if "SOPClassUID" in ds and ("Modality" in ds or "Rows" in ds):
            return ds
    except errors as err:
        log.debug("skipping %s: not readable as DICOM (%s)", path, err)
        return None
    log.debug("skipping %s: not DICOM", path)
    return None


def _where(path: Path | Sequence[Path]) -> Path:
    if isinstance(path, str | os.PathLike):
        return Path(path)
    paths = [str(p) for p in path]
    return Path(os.path.commonpath(paths)) if paths else Path(".")


def read_series(
    path: Path | Sequence[Path], series_uid: str | None = None, *, fast: bool = False
) -> tuple[str, list[Frame], dict[str, Parsed]]:
    """Read the image files of one series.

    Args:
        path: a series folder (searched recursively), a single file, or a list of files.
        series_uid: which SeriesInstanceUID to keep when the files hold several series.
        fast: parse plain native files with `datasets.dicom_fast` (the loader's cold path; their entries are
            then `Header` objects holding only what the loader reads, not full pydicom datasets).

    Returns:
        ``(series_uid, frames, {file: dataset})`` for the image files of the chosen series.

    Raises:
        InputError: no DICOM image found, several series and none chosen, or the chosen one absent.
    """
    where = _where(path)
    files = list_files(path)
    groups: dict[str, dict[str, Parsed]] = {}
    labels: list[str] = []
    for file in files:
        ds = (read_header(file) if fast else None) or read_dataset(file)
        if ds is None:
            continue
        with malformed(file, "DICOM header"):
            if not is_image(ds):
                log.debug("skipping %s: not an image (Modality %s)", file, ds.get("Modality", "?"))
                labels.append(str(ds.get("Modality", "?")))
                continue
            groups.setdefault(str(ds.get("SeriesInstanceUID", "")), {})[str(file)] = ds
    if not groups:
        if labels:
            raise InputError(where, f"holds no image, only {sorted(set(labels))} object(s); label objects need "
                             "their image series (e.g. convert ... --reference SERIES_DIR)")
        if len(files) == 1:
            raise InputError(where, "not a readable DICOM image file (truncated, or not DICOM)")
        raise InputError(where, f"no DICOM image files found ({len(files)} files looked at)")
    if series_uid is None and len(groups) > 1:
        raise InputError(where, f"holds {len(groups)} series, choose one (--series UID): {describe(groups)}")
    uid = series_uid if series_uid is not None else next(iter(groups))
    if uid not in groups:
        raise InputError(where, f"series {uid} not found; choices: {describe(groups)}")
    datasets = groups[uid]
    frames = []
    for file, ds in datasets.items():
        with malformed(file, "DICOM header"):
            frames += frames_of(ds, Path(file))
    return uid, frames, datasets


def describe(groups: dict[str, dict[str, Parsed]]) -> str:
    """One-line summary of several series: ``UID (modality, N files, description); ...``."""
    parts = []
    for uid, items in groups.items():
        file, ds = next(iter(items.items()))
        with malformed(file, "DICOM header"):
            desc = str(ds.get("SeriesDescription", "")).strip()
            parts.append(f"{uid} ({ds.get('Modality', '?')}, {len(items)} files{', ' + desc if desc else ''})")
    return "; ".join(parts)


def decode(ds: Parsed, file: str) -> np.ndarray:
    """Stored pixel values of a dataset: ``(rows, cols)`` or ``(frames, rows, cols)``; InputError if undecodable."""
    with malformed(file, "DICOM pixel module"):
        return _decode(ds, file)


def _decode(ds: Parsed, file: str) -> np.ndarray:
    if isinstance(ds, Header):
        raw = ds.pixels()
        if raw is not None:
            return raw
        full = read_dataset(Path(file))  # e.g. an image without pixel data: pydicom names the problem
        if full is None:
            raise InputError(file, "not readable as DICOM")
        ds = full
    raw = _native_pixels(ds)
    if raw is not None:
        return raw
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoders raise many types; the user needs the file and the reason
        syntax = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(syntax, "name", str(syntax))
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(file, f"cannot decode pixel data ({name}): {reason}") from err
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(file, f"colour images ({ds.get('PhotometricInterpretation', '?')}) are not supported")
    return arr


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian grayscale pixels read straight from the buffer (pydicom's full pixel
    pipeline costs ~2 ms a file); None when any condition for this fast path is not met."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") or "PixelData" not in ds:
        return None
    try:
        bits, signed = int(ds.BitsAllocated), int(ds.PixelRepresentation)
        rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
        stored = int(ds.get("BitsStored", bits))
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16, 32) or stored != bits or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None  # masked high bits and colour go through pydicom
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    data = ds.PixelData
    if len(data) < rows * cols * frames * dtype.itemsize:
        return None
    arr = np.frombuffer(data, dtype=dtype, count=rows * cols * frames)
    return arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


def stack_array(stack: Stack, datasets: dict[str, Parsed]) -> np.ndarray:
    """Decode and scale a stack: float32 ``(columns, rows, K)`` or ``(columns, rows, K, T)``."""
    files = list(dict.fromkeys(f.file for column in stack.grid for f in column))
    compressed = []
    for f in files:
        with malformed(f, "DICOM transfer syntax"):
            if _is_compressed(datasets[f]):
                compressed.append(f)
    decoded: dict[str, np.ndarray] = {}
    if len(compressed) > 1:
        # the JPEG 2000 / JPEG-LS / JPEG codecs release the GIL: decode files side by side
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            decoded.update(zip(compressed, pool.map(lambda f: decode(datasets[f], f), compressed), strict=True))
    # fill a (K, T, rows, cols) buffer plane by plane (contiguous writes), scale once, then view it as
    # (cols, rows, K, T) without a copy
    buf = np.empty((len(stack.grid), stack.n_volumes, stack.first.rows, stack.first.cols), dtype=np.float32)
    for k, column in enumerate(stack.grid):
        for t, f in enumerate(column):
            if f.file not in decoded:
                decoded[f.file] = decode(datasets[f.file], f.file)
            buf[k, t] = _plane(decoded[f.file], f)
    slopes = {(f.slope, f.intercept) for column in stack.grid for f in column}
    if len(slopes) == 1:
        slope, intercept = slopes.pop()
        if slope != 1.0:  # x * 1.0 == x exactly: skip a pass over the volume
            buf *= np.float32(slope)
        if intercept != 0.0:
            buf += np.float32(intercept)
    else:  # per-plane scaling (e.g. Philips, PET)
        for k, column in enumerate(stack.grid):
            for t, f in enumerate(column):
                buf[k, t] = buf[k, t] * np.float32(f.slope) + np.float32(f.intercept)
    out = buf.transpose(3, 2, 0, 1)
    return out[..., 0] if stack.n_volumes == 1 else out


def _is_compressed(ds: Parsed) -> bool:
    if isinstance(ds, Header):
        return False
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(syntax is not None and syntax.is_compressed)


def _plane(arr: np.ndarray, f: Frame) -> np.ndarray:
    if f.mosaic:
        r, c = divmod(f.index, f.mosaic)
        return arr[r * f.rows:(r + 1) * f.rows, c * f.cols:(c + 1) * f.cols]
    if arr.ndim == 3:
        return arr[f.index]
    if f.index:
        raise InputError(f.file, f"frame {f.index + 1} requested from single-frame pixel data")
    return arr


def series_meta(uid: str, stack: Stack, datasets: dict[str, Parsed]) -> dict:
    """Provenance kept with a volume (no patient identifiers)."""
    with malformed(stack.first.file, "DICOM header"):
        return _series_meta(uid, stack, datasets)


def _series_meta(uid: str, stack: Stack, datasets: dict[str, Parsed]) -> dict:
    ds = datasets[stack.first.file]
    meta = {
        "modality": str(ds.get("Modality", "")),
        "series_uid": uid,
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "n_slices": len(stack.grid),
        "n_volumes": stack.n_volumes,
        "n_files": len({f.file for col in stack.grid for f in col}),
    }
    if stack.first.assumed:
        meta["geometry"] = "assumed: no patient orientation/position in the files (identity at the origin)"
        log.warning("%s: no patient geometry; identity orientation at the origin assumed", stack.first.file)
    return meta


def load_stacks(
    path: Path | Sequence[Path], series_uid: str | None = None, *, irregular: str = "error"
) -> list[Volume]:
    """Load every stack of a series (usually one), each as a canonical volume; see `load_series`."""
    where = _where(path)
    uid, frames, datasets = read_series(path, series_uid, fast=True)
    stacks = plan_stacks(frames, where)
    return [_to_volume(uid, s, datasets, irregular, where, i, len(stacks)) for i, s in enumerate(stacks)]


def load_series(
    path: Path | Sequence[Path],
    series_uid: str | None = None,
    *,
    stack: int | None = None,
    irregular: str = "error",
) -> Volume:
    """Load a DICOM series as a canonical (closest RAS+) volume.

    Args:
        path: series folder, single file, or list of files; non-DICOM and non-image files are skipped.
        series_uid: pick this SeriesInstanceUID when the input holds several series.
        stack: pick this stack (0-based, largest first) when the series splits into several (mixed
            orientations, sizes, echoes or image types).
        irregular: ``"error"`` (default) refuses missing slices, non-uniform spacing and gantry tilt;
            ``"resample"`` resamples onto a regular orthogonal grid (recorded in ``meta["resampled"]``).

    Returns:
        Volume with ``array`` float32 ``(I, J, K)`` or ``(I, J, K, T)`` in scaled units (HU for CT), RAS+
        ``affine``, and meta ``modality, series_uid, study_uid, source_orientation, n_slices, ...``.

    Raises:
        InputError: unreadable input, an ambiguous choice, or an irregular grid with ``irregular="error"``.
    """
    where = _where(path)
    uid, frames, datasets = read_series(path, series_uid, fast=True)
    stacks = plan_stacks(frames, where)
    if stack is None and len(stacks) > 1:
        choices = "; ".join(f"{i}: {s.describe()}" for i, s in enumerate(stacks))
        raise InputError(where, f"series {uid} splits into {len(stacks)} stacks (mixed orientation, size, echo "
                         f"or image type); choose one with --stack N: {choices}")
    index = stack or 0
    if not 0 <= index < len(stacks):
        raise InputError(where, f"stack {index} does not exist (series {uid} has {len(stacks)})")
    return _to_volume(uid, stacks[index], datasets, irregular, where, index, len(stacks))


def _to_volume(uid: str, stack: Stack, datasets: dict[str, Parsed], irregular: str, where: Path,
               index: int, n_stacks: int) -> Volume:
    meta = series_meta(uid, stack, datasets)
    if n_stacks > 1:
        meta["stack"] = index
    return finish(stack_array(stack, datasets), stack, irregular, where, meta)


def finish(array: np.ndarray, stack: Stack, irregular: str, where: Path, meta: dict, order: int = 1) -> Volume:
    """Regularise an array laid out on a stack's grid ``(columns, rows, K[, C])`` and canonicalise it.

    Labels pass ``order=0`` so that they stay aligned voxel-for-voxel with the image loaded with the same
    ``irregular`` choice.
    """
    array, aff_lps, note = regularise(array, stack, irregular, where, order=order)
    if note:
        meta = {**meta, "resampled": note}
    return canonical(Volume(array, LPS_TO_RAS @ aff_lps, meta))


def reference_stack(
    reference: Path | Sequence[Path], series_uid: str | None = None, sop_uids: set[str] | None = None
) -> tuple[str, Stack, dict[str, Dataset]]:
    """The image stack that label objects refer to: by series UID, then by the referenced SOP instances.

    Returns:
        ``(series_uid, stack, {file: dataset})``.
    """
    where = _where(reference)
    uid, frames, parsed = read_series(reference, series_uid)
    datasets = cast(dict[str, Dataset], parsed)  # fast=False: full pydicom datasets
    stacks = plan_stacks(frames, where)
    if len(stacks) > 1 and sop_uids:
        sop_of = {file: str(ds.get("SOPInstanceUID", "")) for file, ds in datasets.items()}
        hits = [sum(sop_of[f.file] in sop_uids for col in s.grid for f in col) for s in stacks]
        return uid, stacks[int(np.argmax(hits))], datasets
    return uid, stacks[0], datasets
