"""Write tiny DICOM series with pydicom for tests (imported by the test_* files; not a test module)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-20.0, -30.0, 10.0),
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    step: Sequence[float] | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "PAT-001",
    modality: str = "CT",
    order: Sequence[int] | None = None,
    extra: dict | None = None,
    prefix: str = "1",
    frame_uid: str | None = None,
) -> list[Path]:
    """Write ``stored`` (uint16 ``(rows, columns, slices)``) as one single-frame file per slice.

    Slice ``k`` sits at ``origin + k * step`` (LPS mm); ``step`` defaults to 2 mm along the plane normal.
    ``order`` permutes the file names so that name order differs from position order. ``extra`` holds
    further attributes set on every slice (or callables ``k -> value``). Files are named ``PREFIX-NN.dcm``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop_a = np.asarray(iop, float).reshape(2, 3)
    normal = np.cross(iop_a[0], iop_a[1])
    step_a = np.asarray(step, float) if step is not None else 2.0 * normal
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    n = stored.shape[2]
    order = list(order) if order is not None else list(range(n))
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesDescription = "test series"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin, float) + k * step_a]
        ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
        ds.SliceThickness = f"{float(np.linalg.norm(step_a)):.4f}"
        ds.RescaleSlope = f"{slope}"
        ds.RescaleIntercept = f"{intercept}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[:2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].astype(np.uint16)).tobytes()
        for key, value in (extra or {}).items():
            setattr(ds, key, value(k) if callable(value) else value)
        path = folder / f"{prefix}-{order[k] + 1:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ramp(rows: int = 6, cols: int = 5, slices: int = 4, seed: int = 0) -> np.ndarray:
    """A uint16 ``(rows, cols, slices)`` array with distinct values per voxel (plus seeded noise)."""
    rng = np.random.default_rng(seed)
    base = np.arange(rows * cols * slices, dtype=np.uint16).reshape(rows, cols, slices) * 7
    return base + rng.integers(0, 5, size=base.shape, dtype=np.uint16)


def write_rtstruct(path: Path, image_files: list[Path], contours: list[tuple[int, int, np.ndarray]],
                   series_uid: str | None = None) -> None:
    """RTSTRUCT with ``(roi_number, slice_index, points (N, 3) LPS)`` contours on ``image_files``."""
    images = [pydicom.dcmread(f, stop_before_pixels=True) for f in image_files]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "RTSTRUCT", "PAT-001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = images[0].StudyInstanceUID, generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = series_uid or images[0].SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = images[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    rois, roi_contours = {}, {}
    for number, k, points in contours:
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, f"organ{number}"
        rois[number] = roi
        item = Dataset()
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = images[k].SOPClassUID, images[k].SOPInstanceUID
        item.ContourImageSequence = DicomSequence([ref])
        item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
        item.ContourData = [f"{v:.3f}" for v in points.ravel()]
        roi_contours.setdefault(number, []).append(item)
    ds.StructureSetROISequence = DicomSequence(list(rois.values()))
    seq = []
    for number, items in roi_contours.items():
        rc = Dataset()
        rc.ReferencedROINumber, rc.ContourSequence = number, DicomSequence(items)
        seq.append(rc)
    ds.ROIContourSequence = DicomSequence(seq)
    ds.save_as(path, enforce_file_format=True)


def square(x0: float, y0: float, x1: float, y1: float, z: float) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], float)
