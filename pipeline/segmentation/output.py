"""Segmentation output: masks back into the source geometry (written by `datasets.volume_io.write_nifti`), and
DICOM-SEG referencing the source series (highdicom).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from datasets.volume import InputError, atomic_path
from datasets.world import lps_to_ras

TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def mask_to_source(mask: np.ndarray, mask_affine: np.ndarray, source: nib.Nifti1Image) -> np.ndarray:
    """A mask on a prepared (canonical, maybe resampled) grid, resampled nearest-neighbour onto the source grid."""
    img = nib.Nifti1Image(mask.astype(np.uint8), mask_affine)
    ref = nib.Nifti1Image(np.zeros(source.shape[:3], np.uint8), source.affine)
    return np.asarray(resample_from_to(img, ref, order=0).dataobj).astype(np.uint8)


def sample_on_dicom_frames(mask: np.ndarray, affine: np.ndarray, datasets: Sequence[Dataset]) -> np.ndarray:
    """Nearest-neighbour sample of a RAS mask at every pixel of the given single-frame DICOM images.

    Pixel (row r, column c) of an image lies at `IPP + c * PixelSpacing[1] * X + r * PixelSpacing[0] * Y` (LPS mm,
    PS3.3 C.7.6.2.1.1), so any source orientation and slice order is handled.

    Returns:
        uint8 `(n_images, rows, cols)` in the order of `datasets`.
    """
    inv = np.linalg.inv(affine)
    out = []
    for ds in datasets:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = ipp[None, None] + c[..., None] * dc * iop[None, None, :3] + r[..., None] * dr * iop[None, None, 3:]
        ras = lps_to_ras(lps)
        vox = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        inside = np.all((vox >= 0) & (vox < np.asarray(mask.shape[:3])), axis=-1)
        frame = np.zeros((rows, cols), np.uint8)
        v = vox[inside]
        frame[inside] = mask[v[:, 0], v[:, 1], v[:, 2]] > 0
        out.append(frame)
    return np.stack(out)


def write_dicom_seg(mask: np.ndarray, affine: np.ndarray, datasets: Sequence[Dataset], structure: str,
                    path: Path, algorithm: str = "fewscan") -> None:
    """A binary DICOM-SEG (highdicom) of `mask` referencing the source series `datasets`.

    Args:
        mask: `(I, J, K)` on the RAS grid `affine` (any grid: it is sampled at every source pixel).
        datasets: the source series' single-frame images (pydicom datasets with pixel data).
        structure: segment label.
    """
    if not datasets:
        raise InputError(path, "no source DICOM images to reference")
    datasets = sorted(datasets, key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    for ds in datasets:  # de-identified series often drop type-2 patient/study attributes highdicom copies over
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = sample_on_dicom_frames(mask, affine, datasets)
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version="0.1",
                                              family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=structure[:64],
        segmented_property_category=codes.cid7150.Tissue, segmented_property_type=codes.cid7166.ConnectiveTissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
    seg = hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fewscan", manufacturer_model_name="fewscan",
        software_versions="0.1", device_serial_number="0", omit_empty_frames=False)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
