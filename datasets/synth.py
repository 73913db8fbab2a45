"""Seeded synthetic TCIA-style CT cohort for `make demo`: DICOM series, NIfTI label maps and findings.csv.

Nothing is downloaded: each patient is an analytic torso phantom (body, fat, lungs with vessels, liver, spine,
ribs) holding 3-5 lesions of common and rare types. As in torchio, random sampling (``plan_cohort``, in
``datasets.synth_plan``) is split from rendering (``render_patient``, a deterministic function of the plan) and
writing (``write_cohort``).

Coordinates are DICOM patient coordinates (LPS, mm). Arrays are ``(K, R, C)`` = (slice, row, column), like
``SimpleITK.GetArrayFromImage``: voxel (k, r, c) lies at ``origin + (c * pixel_mm, r * pixel_mm, k * slice_mm)``
(rows run towards posterior, columns towards patient left, slices towards head). The NIfTI label maps store
the same grid as ``(C, R, K)`` with the RAS+ affine (x and y negated).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian
from scipy.ndimage import gaussian_filter, map_coordinates

from datasets.synth_plan import (
    COMMON_TYPES,
    DEFAULT_PATIENTS,
    FINDINGS_COLUMNS,
    LABEL_NAMES,
    LESION,
    LIVER,
    LUNG_L,
    LUNG_R,
    RARE_TYPES,
    RIBS,
    SPINE,
    Lesion,
    PatientPlan,
    SynthSummary,
    anatomy_labels,
    plan_cohort,
    plan_patient,
    rare_assignment,
)
from datasets.volume import InputError, Volume
from datasets.volume_io import write_nifti


# --- rendering -------------------------------------------------------------------------------------------
def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _waves(rng: np.random.Generator, u: np.ndarray, wavelength: float, n: int = 12) -> np.ndarray:
    """Smooth random field of unit variance at points ``u`` ``(N, 3)``: ``n`` random plane waves, wavelengths
    spread over [0.6, 1.6] x ``wavelength`` so that no single stripe pattern shows."""
    k = _unit(rng, n) * (2 * np.pi / (wavelength * rng.uniform(0.6, 1.6, (n, 1))))
    return np.cos(u @ k.T + rng.uniform(0, 2 * np.pi, n)).sum(axis=1) / np.sqrt(n / 2)


def _ramp(signed_mm: np.ndarray, width: float) -> np.ndarray:
    """1 inside (negative signed distance), 0 outside, linear over ``width`` mm: an anti-aliased edge."""
    return np.clip(0.5 - signed_mm / width, 0.0, 1.0)


def _lesion_field(les: Lesion, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opacity and HU of a lesion at points ``u`` ``(N, 3)`` given in its own frame (mm from its centre)."""
    p, r, kind = les.params, les.radius, les.lesion_type
    rng = np.random.default_rng(les.seed)
    dist = np.linalg.norm(u, axis=1)
    radial = np.linalg.norm(u / np.array([1.0, p["axis1"], p["axis2"]], np.float32), axis=1)
    surface = r * (1 + p["lobes"] * np.clip(_waves(rng, u / np.maximum(dist, 1e-6)[:, None], 0.9, 6), -2, 2))
    alpha = _ramp(radial - surface, p["edge"])
    strands = np.zeros_like(alpha)
    if kind == "spiculated_mass":  # thin tapering strands radiating from the core
        for d in _unit(rng, int(p["spicules"])):
            length = r * (1 + p["spicule_len"] * rng.uniform(0.6, 1.4))
            along = np.clip(u @ d, 0, length)
            width = rng.uniform(0.6, 1.0) * (1 - along / length) + 0.3
            strands = np.maximum(strands, _ramp(np.linalg.norm(u - along[:, None] * d, axis=1) - width, 0.5))
    opacity = np.maximum(alpha, strands)
    inside = opacity > 0  # the HU below is only needed where the lesion shows
    u, dist, radial, surface = u[inside], dist[inside], radial[inside], surface[inside]
    value = p["value"] + p["texture"] * _waves(rng, u, 3.0)
    if kind == "calcified_granuloma":
        value += _ramp(radial - p["calc_frac"] * r, 0.6) * (p["calc_value"] - value)
    elif kind == "hemangioma":  # peripheral nodular enhancement
        nodules = _unit(rng, int(p["nodules"])) * 0.75 * r
        near = np.linalg.norm(u[:, None] - nodules[None], axis=2) - rng.uniform(1.2, 2.2)
        value += _ramp(near, 0.6).max(axis=1) * (p["nodule_value"] - value)
    elif kind == "metastasis":  # enhancing rim around a necrotic centre
        value += _ramp(surface - p["rim_mm"] - radial, 0.7) * (p["rim_value"] - value)
    elif kind == "spiculated_mass":  # strands are dense (fibrosis) even around a low-density core
        value = np.where(strands[inside] > alpha[inside], np.maximum(value, -100.0), value)
        if p["bronchus"] > 0:
            axis, offset = _unit(rng, 2)
            through = offset * rng.uniform(0, 1)  # the tube passes within 1 mm of the centre
            tube = np.linalg.norm(np.cross(u - through, axis), axis=1) - p["bronchus"]
            value += _ramp(tube, 0.5) * (radial < 0.9 * surface) * (p["air"] - value)
    elif kind == "cavitary_lesion":  # an air cavity, off-centre, inside a thick irregular wall
        shift = _unit(rng, 1)[0] * p["cavity_shift"] * max(r * (1 - p["cavity_frac"]) - 1.0, 0.0)
        value += _ramp(np.linalg.norm(u - shift, axis=1) - p["cavity_frac"] * r, 0.5) * (p["air"] - value)
    elif kind == "ground_glass_nodule" and p["bubbles"] > 0:
        bubbles = _unit(rng, int(p["bubbles"])) * rng.uniform(0, 0.5 * r, (int(p["bubbles"]), 1))
        near = np.linalg.norm(u[:, None] - bubbles[None], axis=2) - rng.uniform(0.8, 1.6)
        value += _ramp(near, 0.5).max(axis=1) * (p["air"] - value)
    full = np.zeros_like(opacity)
    full[inside] = value
    return opacity, full


def world_axes(plan: PatientPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates (mm) of the slices (z), rows (y) and columns (x) of the grid."""
    n, rows, cols = plan.shape
    ox, oy, oz = plan.origin
    return oz + plan.slice_mm * np.arange(n), oy + plan.pixel_mm * np.arange(rows), ox + plan.pixel_mm * np.arange(cols)


def render_patient(plan: PatientPlan) -> tuple[np.ndarray, np.ndarray]:
    """Render a planned patient (deterministic).

    Returns:
        HU ``(K, R, C)`` int16 and labels ``(K, R, C)`` uint8 (values: ``LABEL_NAMES``).
    """
    an, t = plan.anatomy, plan.anatomy.tissue_hu
    rng = np.random.default_rng(plan.seed)
    z, y, x = world_axes(plan)
    bx, by, bz = (x - an.centre[0])[None, None], (y - an.centre[1])[None, :, None], (z - an.diaphragm_z)[:, None, None]
    labels, fat = anatomy_labels(an, bx, by, bz)
    vox = np.array([plan.slice_mm, plan.pixel_mm, plan.pixel_mm])

    def field(mm: float, shape: tuple[int, ...] = labels.shape) -> np.ndarray:  # unit variance, correlation ~mm
        f = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), mm / vox, truncate=3.0)
        return f / f.std()

    tex = field(1.5)
    hu = np.where(labels > 0, t["muscle"] + 5 * tex, -1000.0).astype(np.float32)
    hu[fat] = t["fat"] + 8 * tex[fat]
    liver = labels == LIVER
    hu[liver] = t["liver"] + 6 * tex[liver]
    # Lung: denser towards the back (gravity); vessels where two smooth random fields both cross zero.
    lung = (labels == LUNG_R) | (labels == LUNG_L)
    if lung.any():
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(lung))
        sub = lung[box]
        v1, v2 = field(2.5, sub.shape), field(2.5, sub.shape)
        vessels = np.exp(-(v1**2 + v2**2) / (2 * 0.12**2))
        lung_hu = np.broadcast_to(t["lung"] + 60 * by / an.half_depth, hu.shape)[box] + 20 * tex[box]
        hu[box][sub] = (lung_hu * (1 - vessels) + 40 * vessels)[sub]
    hu[labels == RIBS] = 450 + 60 * tex[labels == RIBS]
    spine = labels == SPINE
    rs, rr = 0.2 * an.half_depth, np.sqrt(bx**2 + (by - 0.5 * an.half_depth) ** 2)
    hu[spine] = 650.0  # cortical shell and posterior arch
    hu[spine & (rr < rs - 1.2)] = np.broadcast_to(230 + 30 * tex, hu.shape)[spine & (rr < rs - 1.2)]
    hu[np.broadcast_to((rr < rs) & (np.mod(bz - an.disc_phase, 25.0) < 4.0), hu.shape)] = 90.0  # discs
    for les in plan.lesions:
        _paint_lesion(plan, les, (z, y, x), hu, labels)
    hu = gaussian_filter(hu, (1 / 2.355, 0.5, 0.5))  # scanner PSF; slice profile FWHM = slice spacing
    a, b = an.half_width, an.half_depth
    bias = an.bias[0] + an.bias[1] * bx / a + an.bias[2] * by / b + an.bias[3] * bz / 50 + an.bias[4] * (bx / a) ** 2
    hu += np.where(labels > 0, bias, 0.0).astype(np.float32)
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0, 0.6, 0.6))
    hu += t["noise"] * noise / noise.std()
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def _paint_lesion(plan: PatientPlan, les: Lesion, axes: tuple[np.ndarray, ...], hu: np.ndarray,
                  labels: np.ndarray) -> None:
    """Blend one lesion into ``hu`` and ``labels`` (in place) over its bounding box."""
    box, coords = [], []
    for ax, c, step in zip(axes, les.centre[::-1], (plan.slice_mm, plan.pixel_mm, plan.pixel_mm), strict=True):
        lo = max(int(np.floor((c - les.extent - ax[0]) / step)), 0)
        hi = min(int(np.ceil((c + les.extent - ax[0]) / step)) + 1, len(ax))
        box.append(slice(lo, hi))
        coords.append(ax[lo:hi] - c)
    dz, dy, dx = np.meshgrid(*coords, indexing="ij")
    d = np.stack([dx.ravel(), dy.ravel(), dz.ravel()], axis=1)  # LPS offsets from the centre
    alpha, value = _lesion_field(les, (d @ np.array(les.rotation).reshape(3, 3)).astype(np.float32))
    alpha, value = alpha.reshape(dz.shape), value.reshape(dz.shape)
    hu[tuple(box)] = hu[tuple(box)] * (1 - alpha) + value * alpha
    labels[tuple(box)][alpha >= 0.5] = LESION


def crop_mm(hu: np.ndarray, plan: PatientPlan, centre: tuple[float, float, float], size: int = 24,
            spacing: float = 1.0) -> np.ndarray:
    """Trilinear ``(size, size, size)`` cube of ``spacing`` mm, axis-aligned, centred on an LPS point.

    Returns the cube in ``(z, y, x)`` order (HU, float32); used by the tests and the difficulty benchmark.
    """
    offsets = (np.arange(size) - (size - 1) / 2) * spacing
    z, y, x = np.meshgrid(*(c + offsets for c in centre[::-1]), indexing="ij")
    ox, oy, oz = plan.origin
    idx = [(z - oz) / plan.slice_mm, (y - oy) / plan.pixel_mm, (x - ox) / plan.pixel_mm]
    return map_coordinates(hu.astype(np.float32), idx, order=1, mode="nearest")


def lesion_crops(plans: list[PatientPlan], types: tuple[str, ...], size: int = 24
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the patients holding lesions of ``types``, crop around each such lesion centre.

    Returns:
        crops ``(N, size, size, size)`` HU float32, class index into ``types`` ``(N,)``, patient index ``(N,)``.
    """
    crops, classes, groups = [], [], []
    for plan in plans:
        wanted = [les for les in plan.lesions if les.lesion_type in types]
        if wanted:
            hu = render_patient(plan)[0]
            for les in wanted:
                crops.append(crop_mm(hu, plan, les.centre, size))
                classes.append(types.index(les.lesion_type))
                groups.append(plan.index)
    return np.stack(crops), np.array(classes), np.array(groups)


# --- writing ---------------------------------------------------------------------------------------------
def _series_dataset(plan: PatientPlan) -> Dataset:
    """The attributes shared by every slice of the patient's CT series (file meta included)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = plan.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "fewscan synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription, ds.SeriesDescription = "CT-study", "CT-series"
    ds.PatientName = f"ANON^{plan.patient_id}"  # synthetic: no real person behind any of these
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "synthetic phantom: no real patient"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = ds.SpacingBetweenSlices = plan.slice_mm
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.uid("study"), plan.uid("series")
    ds.StudyID, ds.SeriesNumber = "1", 2
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = plan.uid("frame"), ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = plan.shape[1], plan.shape[2]
    ds.PixelSpacing = [plan.pixel_mm, plan.pixel_mm]  # row spacing (y), column spacing (x)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    return ds


def slice_dataset(plan: PatientPlan, hu: np.ndarray, k: int) -> Dataset:
    """The attributes that change from slice to slice (slice ``k`` of the ``(K, R, C)`` HU array)."""
    z = round(float(world_axes(plan)[0][k]), 3)
    ds = Dataset()
    ds.SOPInstanceUID = plan.uid("image", k)
    ds.InstanceNumber = plan.shape[0] - k  # head first: acquisition runs from the top slice down
    ds.ImagePositionPatient = [plan.origin[0], plan.origin[1], z]
    ds.SliceLocation = z
    ds.add_new(0x7FE00010, "OW", (hu[k].astype(np.int32) + 1024).astype("<u2").tobytes())  # stored = HU + 1024
    return ds


def _encoded(ds: Dataset) -> list[tuple[int, bytes]]:
    """Each element of ``ds`` as (tag, explicit VR little endian bytes), encoded by pydicom."""
    out = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_data_element(fp, elem)
        out.append((int(elem.tag), fp.getvalue()))
    return out


def _slice_file(file_meta: FileMetaDataset, shared: list[tuple[int, bytes]], own: Dataset) -> bytes:
    """A complete Part 10 file: preamble, ``DICM``, file meta group, then shared + own elements in tag order.

    The bytes equal what ``(shared + own).save_as(..., enforce_file_format=True)`` writes (tested).
    """
    file_meta.MediaStorageSOPInstanceUID = own.SOPInstanceUID
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    return fp.getvalue() + b"".join(b for _, b in sorted(shared + _encoded(own)))


def series_folders(plan: PatientPlan) -> tuple[str, str]:
    """NBIA-style study and series folder names (no spaces), e.g. ``01-31-2004-NA-CT-study-12345``."""
    d = plan.study_date
    return (f"{d[4:6]}-{d[6:8]}-{d[:4]}-NA-CT-study-{plan.uid('study')[-5:]}",
            f"2.000000-CT-series-{plan.uid('series')[-5:]}")


def write_patient(plan: PatientPlan, hu: np.ndarray, labels: np.ndarray, root: Path) -> int:
    """Write the DICOM series, the NIfTI label map and its JSON sidecar; returns the number of DICOM files."""
    study, series = series_folders(plan)
    series_dir = root / plan.patient_id / study / series
    series_dir.mkdir(parents=True)
    ds = _series_dataset(plan)
    shared = _encoded(ds)  # encode the ~50 shared elements once: pydicom's per-file writer dominated the run
    n = plan.shape[0]
    width = max(2, len(str(n)))
    for k in range(n):  # files numbered in a shuffled order: readers must sort by position
        path = series_dir / f"1-{plan.file_order[k] + 1:0{width}d}.dcm"
        path.write_bytes(_slice_file(ds.file_meta, shared, slice_dataset(plan, hu, k)))
    label_dir = root / plan.patient_id / study / "labels"
    label_dir.mkdir()
    vol = Volume(np.ascontiguousarray(labels.transpose(2, 1, 0)), plan.affine_ras)
    write_nifti(vol, label_dir / f"{series}.nii.gz")
    sidecar = {"series_uid": plan.uid("series"), "label_names": {str(k): v for k, v in LABEL_NAMES.items()}}
    (label_dir / f"{series}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return n


def write_findings(plans: list[PatientPlan], path: Path) -> None:
    """``findings.csv``: one row per lesion, centre in DICOM patient coordinates (LPS mm)."""
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(FINDINGS_COLUMNS)
        for plan in plans:
            for les in plan.lesions:
                out.writerow([plan.patient_id, plan.uid("study"), plan.uid("series"), les.lesion_id,
                              les.lesion_type, *(f"{v:.3f}" for v in les.centre)])


def write_cohort(out_dir: Path, seed: int = 0, n_patients: int | None = None) -> SynthSummary:
    """Write the seeded synthetic cohort into ``out_dir`` (a new or empty folder), all or nothing.

    Layout: ``<patient>/<study>/<series>/1-NN.dcm`` (CT, one file per slice), ``<patient>/<study>/labels/
    <series>.nii.gz`` + ``.json`` (label map, RAS+ affine, same grid) and ``findings.csv`` (LPS centres).
    One process: on shared 2-core machines a process pool measured slower (import and spawn costs).
    """
    out_dir = Path(out_dir)
    rare = rare_assignment(seed, DEFAULT_PATIENTS if n_patients is None else n_patients)  # validates the size
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "already exists and is not an empty folder; choose a new output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plans = []
        for index, rare_type in enumerate(rare):
            plans.append(plan_patient(seed, index, rare_type))
            write_patient(plans[-1], *render_patient(plans[-1]), tmp)
        write_findings(plans, tmp / "findings.csv")
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lesions = Counter(les.lesion_type for plan in plans for les in plan.lesions)
    patients = Counter(t for plan in plans for t in {les.lesion_type for les in plan.lesions})
    files = sum(plan.shape[0] for plan in plans)
    return SynthSummary(out_dir, seed, len(plans), len(plans), files, dict(lesions), dict(patients))


__all__ = ["COMMON_TYPES", "DEFAULT_PATIENTS", "FINDINGS_COLUMNS", "LABEL_NAMES", "LESION", "LIVER", "LUNG_L", "LUNG_R",
           "RARE_TYPES", "RIBS", "SPINE", "Lesion", "PatientPlan", "SynthSummary", "crop_mm", "lesion_crops",
           "plan_cohort", "plan_patient", "rare_assignment", "render_patient", "world_axes", "write_cohort",
           "write_findings", "write_patient"]
