"""Segmentation output: masks back into the source geometry (written by `datasets.volume_io.write_nifti`), and
DICOM-SEG referencing the source series (highdicom).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from datasets.volume import InputError, Volume, atomic_path
from datasets.world import lps_to_ras

TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


ABNORMAL = ("tumor", "tumour", "lesion", "neoplasm", "mass", "nodule", "cancer", "metastasis", "carcinoma")
SIDES = {"left": codes.SCT.Left, "right": codes.SCT.Right}


def segment_codes(structure: str, user: dict[str, str] | None = None) -> tuple[Code, Code, Code | None]:
    """The segment's coded meaning: (property category, property type, laterality modifier or None).

    `user` (`segmentation.codes`) maps a structure name to `SCHEME:VALUE:MEANING` (e.g. `SCT:10200004:Liver`)
    and wins. Otherwise the name, without a left/right part, is looked up in pydicom's SNOMED CT dictionary
    (`liver`, `kidney_left`, `Right kidney`, `spleen`, `pancreas`, ...); a tumour/lesion-like name is a
    morphologically abnormal structure; any other name is a generic anatomical structure (its label carries the
    name).

    Raises:
        InputError: a user code that is not `SCHEME:VALUE:MEANING`.
    """
    category = codes.cid7150.AnatomicalStructure
    words = [w for w in structure.replace("-", " ").replace("_", " ").lower().split() if w]
    side = next((SIDES[w] for w in words if w in SIDES), None)
    base = [w for w in words if w not in SIDES]
    if user and structure in user:
        parts = str(user[structure]).split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise InputError("segmentation.codes", f"{structure}: expected SCHEME:VALUE:MEANING, got "
                             f"{user[structure]!r}")
        return category, Code(parts[1], parts[0], parts[2]), side
    if any(w in ABNORMAL for w in base):
        return codes.cid7150.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm if "lesion" not in base else \
            codes.SCT.Lesion, side
    try:
        found = getattr(codes.SCT, "".join(w.capitalize() for w in base)) if base else None
    except AttributeError:
        found = None
    return category, found or codes.SCT.AnatomicalStructure, side


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
                    path: Path, algorithm: str = "fewscan", user_codes: dict[str, str] | None = None) -> None:
    """A binary DICOM-SEG (highdicom) of `mask` referencing the source series `datasets`.

    Args:
        mask: `(I, J, K)` on the RAS grid `affine`. Pass the mask already on the series' own grid (what the NIfTI
            output holds, `mask_to_source`): every source pixel then samples its own voxel, so the SEG and the
            NIfTI agree voxel for voxel. Any other grid is sampled nearest-neighbour at every source pixel.
        datasets: the source series' single-frame images (pydicom datasets with pixel data).
        structure: the segment label; its coded meaning is `segment_codes(structure, user_codes)`.
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
    category, kind, side = segment_codes(structure, user_codes)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=structure[:64], segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo)
    if side is not None:  # laterality is a modifier of the property type (PS3.3 C.8.20.2)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)]
    seg = hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fewscan", manufacturer_model_name="fewscan",
        software_versions="0.1", device_serial_number="0", omit_empty_frames=False)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)


def write_prediction(mask: np.ndarray, mask_affine: np.ndarray, path: Path, image: Volume, stem: Path,
                     structure: str, user_codes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write one prediction in its input's own geometry: `STEM.nii.gz`, and `STEM_seg.dcm` for a DICOM series.

    Both come from the same mask on the source grid (`mask_to_source`, resampled once), so they agree voxel for
    voxel.

    Args:
        mask: `(I, J, K)` on the prepared grid `mask_affine`.
        path: the input (a NIfTI file or a DICOM series folder); image: it, as loaded.

    Returns:
        `{"input", "nifti", "voxels" (on the source grid), "dicom_seg" (DICOM inputs)}`.
    """
    from datasets.volume_io import write_nifti

    is_nifti = path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))
    source = nib.load(str(path)) if is_nifti else image.to_nifti()
    on_source = mask_to_source(mask, mask_affine, source)
    nifti = stem.with_name(stem.name + ".nii.gz")
    write_nifti(Volume(on_source, source.affine), nifti, dtype=np.uint8)
    row: dict[str, Any] = {"input": str(path), "nifti": str(nifti), "voxels": int(on_source.sum())}
    if image.meta.get("series_uid"):
        from datasets.dicom import read_series

        _, _, datasets = read_series(path, image.meta["series_uid"])
        row["dicom_seg"] = str(stem.with_name(stem.name + "_seg.dcm"))
        write_dicom_seg(on_source, source.affine, list(datasets.values()), structure, Path(row["dicom_seg"]),
                        user_codes=user_codes)
    return row
