"""`load_volume(path)`: one entry point for DICOM folders/files, NIfTI, NRRD and MetaImage files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.volume import InputError, Volume, canonical

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """4x4 voxel -> RAS+ affine from ITK geometry (ITK world is LPS; direction is row-major 3x3)."""
    dim = len(origin)
    d = np.eye(3)
    d[:dim, :dim] = np.asarray(direction, float).reshape(dim, dim)
    aff = np.eye(4)
    aff[:3, :3] = d * np.r_[np.asarray(spacing, float), np.ones(3 - dim)][None, :]
    aff[:dim, 3] = origin
    return LPS_TO_RAS @ aff


def load_nifti(path: Path) -> Volume:
    """NIfTI via nibabel (scaling applied, float32), canonical RAS+."""
    try:
        img = nib.load(path)
        array = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated / foreign files
        raise InputError(path, f"not a readable NIfTI file: {str(err).splitlines()[0] if str(err) else err!r}") from err
    affine = img.affine
    if array.ndim > 4:
        array = array.reshape(array.shape[:3] + (-1,))
    return _checked(path, array, affine, {"source_format": "nifti"})


def load_itk(path: Path) -> Volume:
    """NRRD / MetaImage via SimpleITK (ITK LPS geometry -> RAS+), canonical."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(path, f"not a readable image file: {str(err).strip().splitlines()[-1]}") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, "multi-component (vector/colour) images are not supported")
    if img.GetDimension() not in (2, 3):
        raise InputError(path, f"{img.GetDimension()}D images are not supported")
    array = sitk.GetArrayFromImage(img).T  # ITK array is (z, y, x): transpose to (i, j, k)
    affine = sitk_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    if array.ndim == 2:
        array = array[:, :, None]
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
