"""Label objects -> label volumes aligned voxel-for-voxel with their image (DICOM-SEG, RTSTRUCT, label maps).

DICOM-SEG is read with highdicom, RTSTRUCT contours are rasterised (even-odd rule, so inner contours cut
holes) onto the planes of the referenced image series. Both are laid out on the image's own slice grid
and then go through the same regularisation and canonicalisation as the image (`datasets.dicom.finish`),
so ``labels.array[i, j, k]`` describes ``image.array[i, j, k]``. Label map files (NIfTI/NRRD/MHA) must
share the image's grid up to axis order and flips; anything else is refused unless nearest-neighbour
resampling is asked for (``mismatch="resample"``).

A label volume is ``uint16 (I, J, K)`` with voxel value = segment/ROI number, or with ``masks=True``
``uint8 (I, J, K, S)`` (one channel per segment, overlaps allowed). ``meta["label_names"]`` maps the
number (as a string) to its name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage
from skimage.draw import polygon2mask

from datasets.dicom import finish, load_series, read_dataset, reference_stack
from datasets.dicom_frames import frames_of
from datasets.dicom_geometry import POSITION_TOL_MM, Stack
from datasets.volume import InputError, Volume
from datasets.volume_io import load_volume, read_sidecar

log = logging.getLogger(__name__)

GEOMETRY_TOL_MM = 1e-3


def label_links(ds: Dataset) -> tuple[str, dict[str, str]]:
    """``(referenced image SeriesInstanceUID, {number: name})`` of a SEG or RTSTRUCT dataset (header only)."""
    modality = str(ds.get("Modality", "")).upper()
    if modality == "SEG":
        refs = ds.get("ReferencedSeriesSequence") or []
        uid = str(refs[0].get("SeriesInstanceUID", "")) if refs else ""
        names = {str(s.get("SegmentNumber", i + 1)): str(s.get("SegmentLabel", ""))
                 for i, s in enumerate(ds.get("SegmentSequence") or [])}
        return uid, names
    uid = ""
    for frame_ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame_ref.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                uid = uid or str(series.get("SeriesInstanceUID", ""))
    names = {str(r.get("ROINumber", i + 1)): str(r.get("ROIName", ""))
             for i, r in enumerate(ds.get("StructureSetROISequence") or [])}
    return uid, names


def load_labels(
    path: Path,
    reference: Path | Sequence[Path] | None = None,
    *,
    image: Volume | None = None,
    masks: bool = False,
    irregular: str = "error",
    mismatch: str = "error",
) -> Volume:
    """Load any label object aligned with its image.

    Args:
        path: DICOM-SEG or RTSTRUCT file (needs ``reference``), or a NIfTI/NRRD/MHA label map.
        reference: the image series folder (or files) the SEG/RTSTRUCT refers to; for a label map, an image
            to align to (alternatively pass the loaded ``image``).
        image: an already loaded image volume to align a label map to.
        masks: one channel per segment (uint8 ``(I, J, K, S)``) instead of a label map.
        irregular: passed to the reference series load (must match how the image is loaded).
        mismatch: for label maps, ``"error"`` (default) or ``"resample"`` (nearest neighbour) when the
            label grid is not the image grid.

    Raises:
        InputError: unreadable object, missing or wrong reference, geometry that does not match the image.
    """
    path = Path(path)
    ds = read_dataset(path, pixels=False) if path.is_file() and not _is_volume_file(path) else None
    modality = str(ds.get("Modality", "")).upper() if ds is not None else ""
    if modality in ("SEG", "RTSTRUCT"):
        if reference is None:
            raise InputError(path, f"a {modality} needs its image series: pass --reference SERIES_DIR")
        loader = load_seg if modality == "SEG" else load_rtstruct
        return loader(path, reference, masks=masks, irregular=irregular)
    labels = load_volume(path)
    names = read_sidecar(path).get("label_names")  # fewscan's own label maps carry their names beside them
    if isinstance(names, dict) and names:
        labels.meta["label_names"] = {str(k): str(v) for k, v in names.items()}
    if image is None and reference is not None:
        image = (load_volume(Path(reference), irregular=irregular) if isinstance(reference, str | os.PathLike)
                 else load_series(reference, irregular=irregular))
    return align_label_map(labels, image, where=path, mismatch=mismatch) if image is not None else labels


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"))


def load_seg(path: Path, reference: Path | Sequence[Path], *, masks: bool = False,
             irregular: str = "error") -> Volume:
    """DICOM-SEG (via highdicom) on the grid of its reference series; see `load_labels`."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # highdicom/pydicom raise many types for malformed SEGs
        raise InputError(path, f"not a readable DICOM-SEG: {_first_line(err)}") from err
    ref_uid, names = label_links(seg)
    sources = {str(s) for _, _, s in seg.get_source_image_uids()}
    uid, stack, datasets = _reference(path, reference, ref_uid, sources)
    numbers = [int(n) for n in seg.segment_numbers]
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    max_value = float(seg.get("MaximumFractionalValue", 1) or 1)
    grid = np.zeros((stack.first.cols, stack.first.rows, len(stack.grid), len(numbers)), dtype=np.uint8)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    for i, frame in enumerate(frames_of(seg, path)):
        ident = per_frame[i].get("SegmentIdentificationSequence") if i < len(per_frame) else None
        number = int(ident[0].ReferencedSegmentNumber) if ident else numbers[0]
        plane = seg.get_stored_frame(i + 1).astype(np.float32)
        plane = plane / max_value >= 0.5 if fractional else plane > 0
        k, di, dj = _place(frame.ipp, frame.iop, frame.spacing, stack, path, f"frame {i + 1}")
        _paste(grid[:, :, k, numbers.index(number)], plane.T, di, dj)
    meta = {"label_names": {str(n): names.get(str(n), "") for n in numbers}, "source_format": "dicom-seg",
            "reference_series_uid": uid, "segmentation_type": str(seg.segmentation_type.value)}
    return _finish_labels(grid, numbers, stack, irregular, path, meta, masks)


def load_rtstruct(path: Path, reference: Path | Sequence[Path], *, masks: bool = False,
                  irregular: str = "error") -> Volume:
    """RTSTRUCT contours rasterised onto the planes of the reference series; see `load_labels`."""
    ds = read_dataset(path, pixels=False)
    if ds is None or str(ds.get("Modality", "")).upper() != "RTSTRUCT":
        raise InputError(path, "not a readable RTSTRUCT")
    ref_uid, names = label_links(ds)
    contours = [(int(roi.get("ReferencedROINumber", 0)), c) for roi in ds.get("ROIContourSequence") or []
                for c in roi.get("ContourSequence") or []]
    refs = {str(i.ReferencedSOPInstanceUID) for _, c in contours for i in c.get("ContourImageSequence") or []}
    uid, stack, datasets = _reference(path, reference, ref_uid, refs)
    sops = {str(ds_.get("SOPInstanceUID", "")) for ds_ in datasets.values()}
    missing = sorted(refs - sops)
    if missing:
        raise InputError(path, f"contours reference {len(missing)} image(s) not in the reference series "
                         f"{uid} (e.g. SOP {missing[0]})")
    numbers = sorted({int(k) for k in names} | {n for n, _ in contours})
    grid = np.zeros((stack.first.cols, stack.first.rows, len(stack.grid), len(numbers)), dtype=np.uint8)
    iop, spacing, origins = stack.iop, stack.first.spacing, stack.origins()
    for number, contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
        points = np.asarray([float(v) for v in contour.ContourData], float).reshape(-1, 3)
        if kind == "POINT" or len(points) < 3:
            log.debug("%s: ROI %d: skipping %s contour with %d points", path, number, kind, len(points))
            continue
        dist = points @ stack.normal
        if np.ptp(dist) > POSITION_TOL_MM * 10:
            raise InputError(path, f"ROI {number}: contour is not in the image planes (spans {np.ptp(dist):.2f} mm)")
        k = _slice_index(float(dist.mean()), stack, path, f"ROI {number} contour")
        rel = points - origins[k]
        cols, rows = rel @ iop[0] / spacing[1], rel @ iop[1] / spacing[0]
        mask = polygon2mask((stack.first.cols, stack.first.rows), np.column_stack([cols, rows]))
        grid[:, :, k, numbers.index(number)] ^= mask.astype(np.uint8)  # even-odd: inner contours are holes
    meta = {"label_names": {str(n): names.get(str(n), "") for n in numbers}, "source_format": "rtstruct",
            "reference_series_uid": uid}
    return _finish_labels(grid, numbers, stack, irregular, path, meta, masks)


def _reference(path: Path, reference, ref_uid: str, sop_uids: set[str]) -> tuple[str, Stack, dict]:
    """Reference stack of a label object; the referenced series must be the one given."""
    try:
        uid, stack, datasets = reference_stack(reference, ref_uid or None, sop_uids)
    except InputError as err:
        if ref_uid and "not found" in err.reason:
            raise InputError(path, f"references series {ref_uid}, which {err.path} does not hold") from err
        raise
    return uid, stack, datasets


def _slice_index(distance: float, stack: Stack, path: Path, what: str) -> int:
    k = int(np.argmin(np.abs(stack.positions - distance)))
    gap = float(np.abs(stack.positions[k] - distance))
    if gap > max(POSITION_TOL_MM * 10, 1e-3 * abs(distance)):
        raise InputError(path, f"{what} lies {gap:.2f} mm from the nearest slice of the reference series")
    return k


def _place(ipp, iop, spacing, stack: Stack, path: Path, what: str) -> tuple[int, int, int]:
    """Slice index and integer in-plane offset of a label plane on the image stack; InputError if off-grid."""
    if not np.allclose(np.asarray(iop).reshape(2, 3), stack.iop, atol=1e-3) or not np.allclose(
            spacing, stack.first.spacing, rtol=1e-3):
        raise InputError(path, f"{what}: orientation or pixel spacing differs from the reference series")
    ipp = np.asarray(ipp, float)
    k = _slice_index(float(ipp @ stack.normal), stack, path, what)
    rel = ipp - stack.origins()[k]
    offset = np.array([rel @ stack.iop[0] / spacing[1], rel @ stack.iop[1] / spacing[0]])
    if not np.allclose(offset, np.round(offset), atol=1e-2):
        raise InputError(path, f"{what}: plane is shifted by a fraction of a pixel from the reference series")
    return k, int(round(offset[0])), int(round(offset[1]))


def _paste(target: np.ndarray, plane: np.ndarray, di: int, dj: int) -> None:
    """OR ``plane`` into ``target`` at offset ``(di, dj)`` (clipped to the target)."""
    i0, j0 = max(di, 0), max(dj, 0)
    i1, j1 = min(di + plane.shape[0], target.shape[0]), min(dj + plane.shape[1], target.shape[1])
    if i1 > i0 and j1 > j0:
        target[i0:i1, j0:j1] |= plane[i0 - di:i1 - di, j0 - dj:j1 - dj].astype(np.uint8)


def _finish_labels(grid: np.ndarray, numbers: list[int], stack: Stack, irregular: str, path: Path,
                   meta: dict, masks: bool) -> Volume:
    if not masks:
        overlap = grid.sum(axis=3) > 1
        if overlap.any():
            raise InputError(path, f"segments overlap in {int(overlap.sum())} voxels; load them as masks "
                             "(masks=True / --masks)")
        label = np.zeros(grid.shape[:3], dtype=np.uint16)
        for c, number in enumerate(numbers):
            label[grid[..., c] > 0] = number
        grid = label
    return finish(grid, stack, irregular, path, meta, order=0)


def align_label_map(labels: Volume, image: Volume, *, where: Path, mismatch: str = "error") -> Volume:
    """Put a label map on the image grid: exact when the grids coincide, else refuse or resample (nearest).

    Both volumes are canonical, so coinciding grids have (nearly) equal affines; a label map that covers
    only part of the image with the same spacing and axes is placed by its integer offset.
    """
    if labels.array.shape[:3] == image.array.shape[:3] and np.allclose(labels.affine, image.affine,
                                                                       atol=GEOMETRY_TOL_MM):
        return labels
    to_label = np.linalg.solve(labels.affine, image.affine)  # image voxel -> label voxel
    linear, offset = to_label[:3, :3], to_label[:3, 3]
    if np.allclose(linear, np.eye(3), atol=1e-4) and np.allclose(offset, np.round(offset), atol=1e-3):
        out = np.zeros(image.array.shape[:3] + labels.array.shape[3:], dtype=labels.array.dtype)
        shift = -np.round(offset).astype(int)
        src = tuple(slice(max(-s, 0), min(n, m - s)) for s, n, m in zip(shift, labels.array.shape, out.shape,
                                                                            strict=False))
        dst = tuple(slice(max(s, 0), max(s, 0) + (sl.stop - sl.start)) for s, sl in zip(shift, src, strict=False))
        if all(sl.stop > sl.start for sl in src):
            out[dst] = labels.array[src]
        return _relabelled(labels, out, image)
    problem = (f"label grid {labels.array.shape[:3]} at {np.round(labels.spacing, 3)} mm does not match the "
               f"image grid {image.array.shape[:3]} at {np.round(image.spacing, 3)} mm")
    if mismatch != "resample":
        raise InputError(where, f"geometry differs from its image: {problem} (use mismatch='resample' / "
                         "--resample-labels to resample nearest-neighbour)")
    log.warning("%s: %s; resampled nearest-neighbour", where, problem)
    coords = np.indices(image.array.shape[:3], dtype=np.float32).reshape(3, -1)
    src = linear @ coords + offset[:, None]
    out = ndimage.map_coordinates(labels.array, src, order=0, mode="constant", cval=0)
    return _relabelled(labels, out.reshape(image.array.shape[:3]), image, note=f"resampled: {problem}")


def _relabelled(labels: Volume, array: np.ndarray, image: Volume, note: str = "") -> Volume:
    meta = {**labels.meta, **({"resampled": note} if note else {})}
    return Volume(array, image.affine.copy(), meta)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
