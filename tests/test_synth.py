"""The synthetic demo cohort: valid DICOM, one world geometry for DICOM / NIfTI / findings, determinism, difficulty."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from datasets.synth import (
    COMMON_TYPES,
    DEFAULT_PATIENTS,
    FINDINGS_COLUMNS,
    LABEL_NAMES,
    LESION,
    LIVER,
    LUNG_L,
    LUNG_R,
    RARE_TYPES,
    SPINE,
    _encoded,
    _series_dataset,
    _slice_file,
    lesion_crops,
    plan_cohort,
    render_patient,
    series_folders,
    slice_dataset,
    write_cohort,
)
from datasets.volume import FewscanError, InputError

SEED, N = 3, 5  # 5 patients: one per rare type, plus two without


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list]:
    root = tmp_path_factory.mktemp("synth") / "cohort"
    summary = write_cohort(root, seed=SEED, n_patients=N)
    return root, summary, plan_cohort(SEED, N)


def series_dir(root: Path, plan) -> Path:
    study, series = series_folders(plan)
    return root / plan.patient_id / study / series


def read_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def findings(root: Path) -> list[dict[str, str]]:
    with (root / "findings.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_layout_summary_and_findings_columns(cohort) -> None:
    root, summary, plans = cohort
    assert (root / "findings.csv").read_text().splitlines()[0] == ",".join(FINDINGS_COLUMNS)
    rows = findings(root)
    assert summary.patients == summary.series == N
    assert summary.files == sum(p.shape[0] for p in plans) == len(list(root.rglob("*.dcm")))
    assert sum(summary.lesions.values()) == len(rows) == sum(len(p.lesions) for p in plans)
    assert {r["lesion_type"] for r in rows} >= set(RARE_TYPES)
    assert set(summary.lesions) <= set(COMMON_TYPES + RARE_TYPES)
    assert "spiculated_mass" in str(summary) and str(root) in str(summary)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    for plan in plans:
        folder = series_dir(root, plan)
        assert len(list(folder.glob("1-*.dcm"))) == plan.shape[0]
        label = folder.parent / "labels" / f"{folder.name}.nii.gz"
        assert label.is_file() and label.with_name(f"{folder.name}.json").is_file()


def test_dicom_files_valid_anonymous_and_shuffled(cohort) -> None:
    root, _, plans = cohort
    sops = set()
    for plan in plans:
        files = sorted(series_dir(root, plan).glob("*.dcm"))
        datasets = [pydicom.dcmread(f) for f in files]  # no force=True: real Part 10 files
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
                assert UID(uid).is_valid
            assert str(ds.PatientName) == f"ANON^{ds.PatientID}" and ds.PatientID == plan.patient_id
            assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
            sops.add(ds.SOPInstanceUID)
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        by_name = [float(ds.ImagePositionPatient[2]) for ds in datasets]
        assert by_name != sorted(by_name)  # on-disk order is not slice order
    assert len(sops) == sum(p.shape[0] for p in plans)


def test_sitk_and_pydicom_agree_on_geometry_and_hu(cohort) -> None:
    root, _, plans = cohort
    for plan in plans:
        hu = render_patient(plan)[0]
        image = read_sitk(series_dir(root, plan))
        np.testing.assert_allclose(image.GetOrigin(), plan.origin, atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing(), (plan.pixel_mm, plan.pixel_mm, plan.slice_mm), atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
        datasets = sorted((pydicom.dcmread(f) for f in series_dir(root, plan).glob("*.dcm")),
                          key=lambda ds: float(ds.ImagePositionPatient[2]))
        stack = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
        np.testing.assert_array_equal(stack, hu)
        assert int(datasets[0].InstanceNumber) == plan.shape[0]  # instance 1 is the top slice
        assert (hu[hu > -1000] > -1024).all() and hu.max() > 300  # air, tissue and bone all present


def test_fast_slice_writer_matches_pydicom_save_as(cohort) -> None:
    _, _, plans = cohort
    plan = plans[0]
    hu = render_patient(plan)[0]
    ds, own = _series_dataset(plan), slice_dataset(plan, hu, 3)
    fast = _slice_file(ds.file_meta, _encoded(ds), own)
    for elem in own:
        ds[elem.tag] = elem
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert fast == buf.getvalue()


def test_label_map_shares_world_geometry_with_dicom(cohort) -> None:
    root, _, plans = cohort
    for plan in plans:
        folder = series_dir(root, plan)
        img = nib.load(folder.parent / "labels" / f"{folder.name}.nii.gz")
        sidecar = json.loads(folder.parent.joinpath("labels", f"{folder.name}.json").read_text())
        assert sidecar["series_uid"] == pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID
        assert sidecar["label_names"] == {str(k): v for k, v in LABEL_NAMES.items()}
        labels = np.asarray(img.dataobj)
        np.testing.assert_array_equal(labels, render_patient(plan)[1].transpose(2, 1, 0))
        image = read_sitk(folder)
        hu = sitk.GetArrayFromImage(image)
        means = {}
        for structure in (LIVER, SPINE, LUNG_R, LUNG_L):
            ijk = np.argwhere(labels == structure)[::50]
            ras = nib.affines.apply_affine(img.affine, ijk)
            lps = ras * [-1, -1, 1]
            idx = np.array([image.TransformPhysicalPointToIndex(tuple(p)) for p in lps])  # (c, r, k)
            np.testing.assert_array_equal(idx, ijk)
            means[structure] = hu[idx[:, 2], idx[:, 1], idx[:, 0]].mean()
        assert 80 < means[LIVER] < 130 and means[SPINE] > 200
        assert means[LUNG_R] < -650 and means[LUNG_L] < -650
        # the liver lies on the patient's right: negative LPS x relative to the body axis
        liver_x = (img.affine @ np.r_[np.argwhere(labels == LIVER).mean(0), 1])[0] * -1
        assert liver_x < plan.anatomy.centre[0]


def test_findings_centres_land_on_lesions(cohort) -> None:
    root, _, plans = cohort
    by_series = {p.uid("series"): p for p in plans}
    for row in findings(root):
        plan = by_series[row["series_uid"]]
        assert row["study_uid"] == plan.uid("study") and row["patient_id"] == plan.patient_id
        folder = series_dir(root, plan)
        image = read_sitk(folder)
        lps = tuple(float(row[c]) for c in ("lps_x", "lps_y", "lps_z"))
        c, r, k = image.TransformPhysicalPointToIndex(lps)
        img = nib.load(folder.parent / "labels" / f"{folder.name}.nii.gz")
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), np.array(lps) * [-1, -1, 1]))
        assert tuple(ijk.astype(int)) == (c, r, k)
        assert np.asarray(img.dataobj)[c, r, k] == LESION, row["lesion_id"]
        value = sitk.GetArrayFromImage(image)[k, r, c]
        if row["lesion_type"] in ("solid_nodule", "calcified_granuloma"):
            assert value > -300, row  # far denser than the surrounding lung (about -850 HU)
        if row["lesion_type"] == "cyst":
            assert value < 75, row  # far below the enhanced liver (95-115 HU)


def test_default_plan_has_enough_rare_patients_and_no_overlap() -> None:
    plans = plan_cohort(0)
    assert len(plans) == DEFAULT_PATIENTS
    patients = {t: {p.index for p in plans for les in p.lesions if les.lesion_type == t}
                for t in COMMON_TYPES + RARE_TYPES}
    for rare in RARE_TYPES:
        assert len(patients[rare]) >= 12  # 3-way 5-shot 5-query with support and query from different patients
        assert len(patients[rare]) < min(len(patients[c]) for c in COMMON_TYPES)
    for plan in plans:
        assert 3 <= len(plan.lesions) <= 5
        z0, z1 = plan.origin[2], plan.origin[2] + (plan.shape[0] - 1) * plan.slice_mm
        for i, a in enumerate(plan.lesions):
            assert z0 < a.centre[2] < z1
            for b in plan.lesions[i + 1:]:
                assert np.linalg.norm(np.subtract(a.centre, b.centre)) >= a.extent + b.extent


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = write_cohort(tmp_path / "a", seed=7, n_patients=2)
    b = write_cohort(tmp_path / "b", seed=7, n_patients=2)
    c = write_cohort(tmp_path / "c", seed=8, n_patients=2)
    files_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    for rel in files_a:  # DICOM, NIfTI, sidecars and findings.csv alike
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    one = pydicom.dcmread(next(a.out_dir.joinpath("SYN0001").rglob("1-01.dcm")))
    other = pydicom.dcmread(next(c.out_dir.joinpath("SYN0001").rglob("1-01.dcm")))
    assert one.StudyInstanceUID != other.StudyInstanceUID and one.SOPInstanceUID != other.SOPInstanceUID
    assert one.PixelData != other.PixelData
    assert (a.out_dir / "findings.csv").read_text() != (c.out_dir / "findings.csv").read_text()


def test_refuses_non_empty_output_and_bad_size(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        write_cohort(tmp_path / "full", n_patients=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    with pytest.raises(FewscanError, match="at least one patient"):
        write_cohort(tmp_path / "new", n_patients=0)
    assert not (tmp_path / "new").exists()


def test_linear_probe_on_raw_intensities_does_not_solve_rare_types() -> None:
    """Crops 24^3 at 1 mm around rare findings; multinomial logistic regression, patient-disjoint halves."""
    crops, y, groups = lesion_crops(plan_cohort(11, 120), RARE_TYPES)
    x = torch.as_tensor(np.clip((crops + 1000) / 1400, 0, 1).reshape(len(crops), -1))
    patients = np.random.default_rng(0).permutation(np.unique(groups))
    train = torch.as_tensor(np.isin(groups, patients[: len(patients) // 2]))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)
    target = torch.as_tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problem: extra threads only contend on shared machines
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(x.shape[1], len(RARE_TYPES))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[train]), target[train]).backward()
            opt.step()
        with torch.no_grad():
            train_acc = (model(x[train]).argmax(1) == target[train]).float().mean().item()
            acc = (model(x[~train]).argmax(1) == target[~train]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"linear probe on raw intensities: held-out accuracy {acc:.3f} (train {train_acc:.3f}, chance 0.333)")
    assert train_acc > 0.9  # the probe did fit its training crops: a failure to generalise, not to train
    assert acc < 0.8, f"rare types solved by a linear probe: {acc:.3f}"
