"""`python -m pipeline convert INPUT OUT.nii.gz`: DICOM series / SEG / RTSTRUCT / label map -> NIfTI.

Like dcm2niix: voxel values are the scaled values (HU for CT), stored in the smallest integer type that
holds them exactly (else float32); the world geometry is the DICOM one; multi-volume series become 4D.
Unlike dcm2niix the array is written in closest-RAS+ axis order (same world geometry, `canonical`).
A sidecar ``OUT.json`` holds the non-identifying provenance (modality, UIDs, source orientation, notes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datasets.volume import InputError, Volume
from datasets.volume_io import write_nifti

log = logging.getLogger(__name__)


def storage_dtype(array: np.ndarray) -> np.dtype:
    """Smallest of int16/uint16/int32 holding every value exactly, else float32 (uint8 for small labels)."""
    if array.dtype == np.uint8:
        return np.dtype(np.uint8)
    if array.size == 0 or not np.all(np.isfinite(array)):
        return np.dtype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        for dtype in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


def _outputs(out: Path, n: int) -> list[Path]:
    """``OUT.nii.gz`` for the first volume, ``OUT_stack1.nii.gz`` ... for further stacks of one series."""
    name = out.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    stem = name[: -len(suffix)]
    return [out] + [out.with_name(f"{stem}_stack{i}{suffix}") for i in range(1, n)]


def convert(
    source: Path | Sequence[Path],
    out: Path,
    *,
    series_uid: str | None = None,
    reference: Path | None = None,
    stack: int | None = None,
    irregular: str = "error",
    masks: bool = False,
) -> list[Path]:
    """Convert one input to NIfTI.

    Args:
        source: DICOM series folder, DICOM file, SEG/RTSTRUCT file (with ``reference``), or a label map file
            (aligned to ``reference`` when given).
        out: output ``.nii`` or ``.nii.gz`` path.
        series_uid: which series, when the folder holds several.
        reference: image series that a SEG/RTSTRUCT/label map belongs to.
        stack: write only this stack of a series that splits into several (default: all of them,
            ``OUT_stack1.nii.gz`` ... for the second and later).
        irregular: ``"error"`` or ``"resample"`` for missing slices, non-uniform spacing, gantry tilt.
        masks: for label objects, one 0/1 channel per segment (4D) instead of a label map.

    Returns:
        The NIfTI files written. Nothing is written when any input fails.
    """
    out = Path(out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise InputError(out, "output must end in .nii or .nii.gz")
    volumes = _load(source, series_uid=series_uid, reference=reference, stack=stack, irregular=irregular,
                    masks=masks)
    written = []
    for volume, path in zip(volumes, _outputs(out, len(volumes)), strict=True):
        written.append(write_nifti(volume, path, dtype=storage_dtype(volume.array), sidecar=True))
        log.debug("wrote %s: shape %s, %s", path, volume.array.shape, volume.meta.get("source_orientation"))
    return written


def _load(source, *, series_uid, reference, stack, irregular, masks) -> list[Volume]:
    from datasets.dicom import load_series, load_stacks, read_dataset
    from datasets.labels import load_labels
    from datasets.volume_io import ITK_SUFFIXES, NIFTI_SUFFIXES, load_volume

    if isinstance(source, str | Path):
        source = Path(source)
        if not source.exists():
            raise InputError(source, "no such file or folder")
        is_volume_file = source.name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)
        if source.is_file() and not is_volume_file:
            ds = read_dataset(source, pixels=False)
            if ds is not None and str(ds.get("Modality", "")).upper() in ("SEG", "RTSTRUCT"):
                return [load_labels(source, reference, masks=masks, irregular=irregular)]
        if is_volume_file:
            if reference is not None:
                return [load_labels(source, reference, irregular=irregular)]
            return [load_volume(source)]
    if stack is not None:
        return [load_series(source, series_uid, stack=stack, irregular=irregular)]
    return load_stacks(source, series_uid, irregular=irregular)
