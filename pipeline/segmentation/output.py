"""Segmentation output: masks back into the source geometry (NIfTI), DICOM-SEG referencing the source series
(highdicom), and a seeded synthetic Decathlon folder of small MR-like crops (tests and benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from datasets.volume import InputError, atomic_path

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def mask_to_source(mask: np.ndarray, mask_affine: np.ndarray, source: nib.Nifti1Image) -> np.ndarray:
    """A mask on a prepared (canonical, maybe resampled) grid, resampled nearest-neighbour onto the source grid."""
    img = nib.Nifti1Image(mask.astype(np.uint8), mask_affine)
    ref = nib.Nifti1Image(np.zeros(source.shape[:3], np.uint8), source.affine)
    return np.asarray(resample_from_to(img, ref, order=0).dataobj).astype(np.uint8)


def write_nifti_mask(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A uint8 label NIfTI (qform and sform = `affine`), written atomically."""
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


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
        ras = lps @ LPS_TO_RAS.T
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


# --- synthetic Decathlon folder ----------------------------------------------------------------------------
SYNTH_STRUCTURES = {1: "liver", 2: "kidney", 3: "spleen"}


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One MR-like crop `(I, J, K)` (float32, arbitrary units) and its label map (0 bg, 1 liver, 2 kidney, 3 spleen).

    A body ellipsoid with a smooth bias field and noise, three organ ellipsoids with organ-specific intensity and
    jittered size/position, plus two unlabelled distractor blobs.
    """
    s = np.asarray(shape, float)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    body = _ellipsoid(shape, s / 2, s * np.array([0.47, 0.45, 0.6]))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    bias = 1.0 + 0.15 * (grid @ rng.normal(0, 1, 3))
    image[body] = 300.0
    organs = [(1, [0.35, 0.45, 0.5], [0.2, 0.2, 0.25], 700.0), (2, [0.65, 0.6, 0.45], [0.1, 0.12, 0.15], 500.0),
              (3, [0.68, 0.35, 0.55], [0.12, 0.12, 0.15], 900.0)]
    for value, centre, radii, intensity in organs:
        c = s * (np.asarray(centre) + rng.uniform(-0.05, 0.05, 3))
        r = s * np.asarray(radii) * rng.uniform(0.8, 1.2, 3)
        m = _ellipsoid(shape, c, r) & body
        image[m] = intensity * rng.uniform(0.9, 1.1)
        label[m] = value
    for _ in range(2):  # unlabelled distractors: pseudo-structures the SSL must not rely on labels for
        m = _ellipsoid(shape, s * rng.uniform(0.25, 0.75, 3), s * rng.uniform(0.05, 0.1, 3)) & body & (label == 0)
        image[m] = rng.uniform(400, 1000)
    image = image * bias + rng.normal(0, 20, shape)
    return np.clip(image, 0, None).astype(np.float32), label


def write_synthetic_decathlon(root: Path, n_cases: int = 12, shape: tuple[int, int, int] = (40, 50, 40),
                              seed: int = 0, spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
                              unlabelled: int = 0) -> Path:
    """A Decathlon-format folder (`dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`) of synthetic MR crops."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "imagesTs").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    training, test = [], []
    for i in range(n_cases + unlabelled):
        image, label = synthetic_case(rng, shape)
        name = f"synth_{i:03d}.nii.gz"
        folder = "imagesTr" if i < n_cases else "imagesTs"
        nib.save(nib.Nifti1Image(image, affine), str(root / folder / name))
        if i < n_cases:
            nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    spec = {"name": "SynthMR", "modality": {"0": "MRI"}, "labels": {"0": "background",
            **{str(k): v for k, v in SYNTH_STRUCTURES.items()}}, "numTraining": len(training),
            "numTest": len(test), "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root
