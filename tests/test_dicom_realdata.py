"""DICOM loading against dcm2niix / dicom2nifti references and real vendor data (read each PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.dicom import load_series
from datasets.volume import InputError
from datasets.volume_io import load_nifti

pytestmark = pytest.mark.realdata

D2N_CASES = ["ge/anatomical", "generic/anatomical", "generic/compressed", "generic/compressed_j2k",
             "generic/compressed_jpeg", "generic/compressed_jpegls", "generic/compressed_rle", "hitachi/anatomical",
             "philips/anatomical", "philips_enhanced/anatomical", "siemens/anatomical",
             "siemens_multiframe/anatomical", "failing/slicecount"]


def world_equal(a, b, atol_mm: float = 1e-3) -> None:
    """Same grid (affine within ``atol_mm``) and identical voxels; both are canonical so axes coincide."""
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=atol_mm)
    np.testing.assert_array_equal(a.array, b.array)


def test_dcm_qa_ts_all_transfer_syntaxes_equal_dcm2niix(shared_data: Path) -> None:
    root = shared_data / "dcm_qa_ts"
    first = None
    for i in range(1, 10):  # ExplLE, ImplLE, ExplBE, RLE, JPEG lossless x2, JPEG-LS x2, J2K lossless
        vol = load_series(root / "In" / f"{i}.dcm")
        assert vol.array.shape == (64, 64, 35)  # a 6x6 mosaic of 35 slices, unpacked
        world_equal(vol, load_nifti(root / "Ref" / f"{i}.nii"))
        if first is None:
            first = vol
        np.testing.assert_array_equal(vol.array, first.array)


@pytest.mark.parametrize("case", D2N_CASES)
def test_dicom2nifti_vendor_series_equal_ground_truth(shared_data: Path, case: str) -> None:
    root = shared_data / "dicom2nifti_testdata" / case
    vol = load_series(root.parent / (root.name + "/001"))
    truth = load_nifti(root.parent / (root.name + "/001_ground_truth.nii.gz"))
    if truth.array.ndim == 4 and truth.array.shape[3] == 1:
        truth.array = truth.array[..., 0]
    world_equal(vol, truth)


def test_dicom2nifti_failing_cases_give_clear_errors_or_documented_resample(shared_data: Path) -> None:
    root = shared_data / "dicom2nifti_testdata" / "failing"
    with pytest.raises(InputError, match="gantry tilt of 14.00 degrees.*--irregular resample"):
        load_series(root / "gantrytilting" / "001")
    tilted = load_series(root / "gantrytilting" / "001", irregular="resample")
    assert "gantry tilt" in tilted.meta["resampled"]
    axes = tilted.affine[:3, :3] / np.asarray(tilted.spacing)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-6)  # orthogonal grid, no shear left
    with pytest.raises(InputError, match="splits into 2 stacks.*sagittal.*axial"):
        load_series(root / "sliceorientation" / "001")
    stacks = [load_series(root / "sliceorientation" / "001", stack=i) for i in (0, 1)]
    assert [sorted(v.array.shape) for v in stacks] == [[2, 288, 288]] * 2  # one sagittal, one axial pair
    assert not np.allclose(stacks[0].affine[:3, :3], stacks[1].affine[:3, :3], atol=0.1)


def test_pydicom_transfer_syntaxes_decode_identically(shared_data: Path) -> None:
    single = shared_data / "pydicom_testdata" / "single"
    ref = load_series(single / "MR_small.dcm")
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        world_equal(load_series(single / name), ref)
    store = shared_data / "pydicom_testdata" / "pydicom_data_store"
    multi = load_series(store / "emri_small.dcm")  # 10-frame MR stripped of positions: identity assumed
    assert multi.array.shape == (64, 64, 10) and "assumed" in multi.meta["geometry"]
    for name in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(load_series(store / name).array, multi.array)
    np.testing.assert_array_equal(load_series(store / "MR2_J2KR.dcm").array, load_series(store / "MR2_UNCR.dcm").array)
    deflate = load_series(single / "image_dfl.dcm")
    assert deflate.array.shape == (512, 512, 1) and deflate.array.max() > 0
    ct = load_series(store / "eCT_Supplemental.dcm")  # enhanced CT, per-frame functional groups
    assert ct.array.shape == (512, 512, 2) and ct.meta["modality"] == "CT" and ct.array.min() < -900


def test_12bit_jpeg_without_a_permissive_decoder_is_a_clear_error(shared_data: Path) -> None:
    with pytest.raises(InputError, match=r"JPGExtended\.dcm: cannot decode pixel data \(JPEG Extended"):
        load_series(shared_data / "pydicom_testdata" / "single" / "JPGExtended.dcm")


def test_totalsegmentator_jpeg2000_series_liver_hu_in_world_coordinates(shared_data: Path) -> None:
    root = shared_data / "totalsegmentator_example"
    ct = load_series(root / "example_ct_dicom")
    seg = load_nifti(root / "example_seg_dicom.nii.gz")  # stores rows flipped vs the DICOM (NOTES.md)
    assert ct.array.shape == (512, 512, 20) and seg.meta["source_orientation"] != ct.meta["source_orientation"]
    # map every label voxel to world mm, then into the CT's voxel grid
    idx = np.argwhere(seg.array == 5)  # 5 = liver (class_map_total.json)
    world = seg.affine @ np.c_[idx, np.ones(len(idx))].T
    ijk = np.rint(np.linalg.solve(ct.affine, world)[:3]).astype(int)
    liver_hu = ct.array[tuple(ijk)].mean()
    assert 80 < liver_hu < 100  # ~ 89 HU; a flipped comparison gives about -75
