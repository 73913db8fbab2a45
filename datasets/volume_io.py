"""`load_volume(path)`: one entry point for DICOM folders/files, NIfTI, NRRD and MetaImage files; `write_nifti`: the
one NIfTI writer (atomic)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from datasets.guard import check_size, check_stored, malformed
from datasets.volume import InputError, Volume, atomic_path, canonical
from datasets.world import sitk_ras_affine

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def load_nifti(path: Path) -> Volume:
    """NIfTI via nibabel (scaling applied, float32), canonical RAS+."""
    try:
        img = nib.load(path)
        # the header's shape, before a byte is decoded: scaled data comes back as float64, the rest goes on as
        # float32 at least
        shape, stored = img.header.get_data_shape(), img.header.get_data_dtype().itemsize
        scaled = getattr(img.dataobj, "slope", 1.0) != 1.0 or getattr(img.dataobj, "inter", 0.0) != 0.0
        check_size(path, shape, 8 if scaled else max(4, stored))
        gz = str(path).lower().endswith(".gz")
        data_bytes = Path(path).stat().st_size - (0 if gz else int(img.dataobj.offset))
        check_stored(path, math.prod(shape) * stored, data_bytes, gz, "voxel data")
        array = np.asarray(img.dataobj)
    except InputError:
        raise
    except Exception as err:  # nibabel raises many types for truncated / foreign files
        raise InputError(path, f"not a readable NIfTI file: {str(err).splitlines()[0] if str(err) else err!r}") from err
    affine = img.affine
    if array.ndim > 4:
        array = array.reshape(array.shape[:3] + (-1,))
    with malformed(path, "NIfTI header"):
        return _checked(path, array, affine, {"source_format": "nifti"})


def load_itk(path: Path) -> Volume:
    """NRRD / MetaImage via SimpleITK (ITK LPS geometry -> RAS+), canonical."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only: check the declared size before reading the pixels
        check_size(path, reader.GetSize(), 8 * reader.GetNumberOfComponents())
        img = reader.Execute()
    except RuntimeError as err:
        raise InputError(path, f"not a readable image file: {str(err).strip().splitlines()[-1]}") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, "multi-component (vector/colour) images are not supported")
    if img.GetDimension() not in (2, 3):
        raise InputError(path, f"{img.GetDimension()}D images are not supported")
    array = sitk.GetArrayFromImage(img).T  # ITK array is (z, y, x): transpose to (i, j, k)
    affine = sitk_ras_affine(img)
    if array.ndim == 2:
        array = array[:, :, None]
    with malformed(path, "image header"):
        return _checked(path, array, affine, {"source_format": path.suffix.lstrip(".").lower()})


def _checked(path: Path, array: np.ndarray, affine: np.ndarray, meta: dict) -> Volume:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "invalid (singular or non-finite) voxel-to-world affine")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.all():
            raise InputError(path, "image holds no finite values (all NaN/inf)")
        if bad.any():
            raise InputError(path, f"image holds {int(bad.sum())} NaN/inf voxels")
    if array.dtype != np.float32 and not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32)
    return canonical(Volume(array, np.asarray(affine, float), meta))


def load_volume(path: Path, **kwargs) -> Volume:
    """Load any supported input as a canonical volume.

    Args:
        path: DICOM series folder or file (`datasets.dicom.load_series`; kwargs such as ``series_uid``,
            ``irregular`` are passed on), or a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file.

    Returns:
        Volume in canonical RAS+ orientation. DICOM images are float32 in scaled units; NIfTI/NRRD keep their
        stored integer type for label maps and become float32 otherwise.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return load_nifti(path)
    if name.endswith(ITK_SUFFIXES):
        return load_itk(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    from datasets.dicom import load_series

    return load_series(path, **kwargs)


def write_nifti(image: Volume | sitk.Image, path: Path, *, dtype: np.dtype | type | None = None,
                sidecar: bool = False) -> Path:
    """Write a volume as NIfTI, atomically (nothing half-written on failure); returns `path`.

    A `Volume` is written by nibabel: array `(I, J, K[, T])` as stored (or cast to `dtype`), qform and sform both the
    affine (code 1, scanner), units mm; with `sidecar`, its meta as `path` with `.json` for `.nii[.gz]`. A SimpleITK
    image (an ITK displacement field) is written by SimpleITK, which keeps ITK's own NIfTI vector layout.
    """
    path = Path(path)
    if not isinstance(image, Volume):
        import SimpleITK as sitk

        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp))
        return path
    img = Volume(image.array if dtype is None else image.array.astype(dtype, copy=False), image.affine).to_nifti()
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    if sidecar:
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        with atomic_path(path.with_name(stem + ".json")) as tmp:
            tmp.write_text(json.dumps(_jsonable(image.meta), indent=2, sort_keys=True) + "\n")
    return path


def _jsonable(meta: dict) -> dict:
    return {k: (v if isinstance(v, str | int | float | bool | dict | list) or v is None else str(v))
            for k, v in meta.items()}


def read_sidecar(path: Path) -> dict[str, Any]:
    """``<name>.json`` (name without .nii.gz etc.) or ``<file>.json`` beside a volume file, if present."""
    stem = path.name
    for suffix in VOLUME_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for candidate in (path.with_name(stem + ".json"), path.with_name(path.name + ".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(candidate, f"invalid JSON sidecar: {err}") from err
            return data if isinstance(data, dict) else {}
    return {}
