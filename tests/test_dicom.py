"""DICOM series loading on small series written with pydicom: sorting, scaling, geometry, selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import ramp, write_series

from datasets.dicom import load_series
from datasets.volume import InputError


def source_value_at(vol, ijk, stored, iop, origin, pixel_spacing, step, slope, intercept) -> float:
    """Expected value at loaded voxel ``ijk``: map to LPS world, then back to the stored (row, col, slice)."""
    ras = vol.affine @ np.r_[ijk, 1.0]
    lps = ras[:3] * np.array([-1.0, -1.0, 1.0])
    iop_a = np.asarray(iop, float).reshape(2, 3)
    basis = np.column_stack([iop_a[0] * pixel_spacing[1], iop_a[1] * pixel_spacing[0], step])
    col, row, k = np.linalg.solve(basis, lps - np.asarray(origin, float))
    r, c, kk = (round(row), round(col), round(k))
    assert np.allclose([row, col, k], [r, c, kk], atol=1e-4)
    return float(stored[r, c, kk]) * slope + intercept


@pytest.mark.parametrize(
    "iop",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1), (0.8, 0.6, 0, -0.6, 0.8, 0)],
    ids=["axial", "sagittal", "coronal", "oblique"],
)
def test_geometry_and_values_match_the_dicom_definition(tmp_path: Path, iop) -> None:
    stored = ramp(6, 5, 4)
    origin, spacing, slope, intercept = (-20.0, -30.0, 10.0), (0.8, 0.7), 2.0, -1024.0
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    step = 2.5 * normal
    # file names deliberately not in slice order: sorting must use positions
    write_series(tmp_path, stored, iop=iop, origin=origin, pixel_spacing=spacing, step=step,
                 slope=slope, intercept=intercept, order=[2, 0, 3, 1])
    vol = load_series(tmp_path)
    assert vol.array.dtype == np.float32
    assert sorted(vol.array.shape) == sorted((6, 5, 4))
    assert np.allclose(sorted(vol.spacing), sorted((0.8, 0.7, 2.5)))
    assert vol.orientation == "RAS" or iop[0] == 0.8  # the oblique case is only closest-RAS
    rng = np.random.default_rng(0)
    for _ in range(20):
        ijk = [int(rng.integers(0, s)) for s in vol.array.shape]
        expected = source_value_at(vol, ijk, stored, iop, origin, spacing, step, slope, intercept)
        assert vol.array[tuple(ijk)] == pytest.approx(expected)


def test_axial_series_is_flipped_to_ras_and_records_source(tmp_path: Path) -> None:
    stored = ramp(6, 5, 3)
    write_series(tmp_path, stored, intercept=-1000.0)
    vol = load_series(tmp_path)
    expected = stored.transpose(1, 0, 2).astype(np.float32) - 1000.0  # (col, row, slice), LPS
    np.testing.assert_array_equal(vol.array, expected[::-1, ::-1, :])
    assert vol.meta["source_orientation"] == "LPS"
    assert vol.meta["modality"] == "CT" and vol.meta["n_slices"] == 3
    assert "PAT-001" not in repr(vol.meta)
    # voxel (0,0,0) of the RAS array is the stored (row 0, last column) pixel of the first slice
    corner = vol.affine @ np.array([0, 0, 0, 1.0])
    lps_corner = np.array([-20.0 + 4 * 0.7, -30.0 + 5 * 0.8, 10.0])
    np.testing.assert_allclose(corner[:3], lps_corner * [-1, -1, 1], atol=1e-4)


def test_several_series_need_a_choice_and_junk_is_skipped(tmp_path: Path) -> None:
    write_series(tmp_path / "a", ramp(4, 4, 3), series_uid="1.2.3.1")
    write_series(tmp_path / "b", ramp(4, 4, 2, seed=1), series_uid="1.2.3.2")
    (tmp_path / "a" / "notes.txt").write_text("not dicom")
    (tmp_path / "b" / "DICOMDIR.dcm").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match=r"1\.2\.3\.1.*1\.2\.3\.2|1\.2\.3\.2.*1\.2\.3\.1"):
        load_series(tmp_path)
    vol = load_series(tmp_path, series_uid="1.2.3.2")
    assert vol.array.shape == (4, 4, 2) and vol.meta["series_uid"] == "1.2.3.2"
    assert load_series(tmp_path / "a").array.shape == (4, 4, 3)


def test_list_of_files_and_missing_series(tmp_path: Path) -> None:
    files = write_series(tmp_path, ramp(4, 4, 3), series_uid="1.2.9")
    assert load_series(files[:2]).array.shape == (4, 4, 2)
    with pytest.raises(InputError, match="not found"):
        load_series(tmp_path, series_uid="9.9.9")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM image"):
        load_series(empty)


def test_repeated_positions_become_4d_in_time_order(tmp_path: Path) -> None:
    uid = "1.2.3.44"
    vols = [ramp(4, 5, 3, seed=t) + 100 * t for t in range(3)]
    for t in (2, 0, 1):  # written out of time order
        write_series(tmp_path, vols[t], series_uid=uid, prefix=f"t{t}", intercept=0.0,
                     extra={"TemporalPositionIdentifier": t + 1, "InstanceNumber": lambda k, t=t: 10 * t + k})
    vol = load_series(tmp_path)
    assert vol.array.shape == (5, 4, 3, 3) and vol.meta["n_volumes"] == 3
    for t in range(3):
        np.testing.assert_array_equal(vol.array[..., t], vols[t].transpose(1, 0, 2)[::-1, ::-1, :])


def test_mixed_echoes_split_into_stacks(tmp_path: Path) -> None:
    uid = "1.2.3.55"
    write_series(tmp_path, ramp(4, 4, 3), series_uid=uid, prefix="e1", extra={"EchoNumbers": 1})
    write_series(tmp_path, ramp(4, 4, 3, seed=2), series_uid=uid, prefix="e2", extra={"EchoNumbers": 2})
    with pytest.raises(InputError, match="splits into 2 stacks.*--stack"):
        load_series(tmp_path)
    a, b = load_series(tmp_path, stack=0), load_series(tmp_path, stack=1)
    assert a.array.shape == b.array.shape == (4, 4, 3) and not np.array_equal(a.array, b.array)


def test_missing_slice_is_refused_or_resampled(tmp_path: Path) -> None:
    stored = ramp(4, 4, 5)
    files = write_series(tmp_path, stored, intercept=0.0)
    files[2].unlink()  # positions 0, 2, 6, 8 mm remain: one gap of 4 mm
    with pytest.raises(InputError, match="1 missing slice"):
        load_series(tmp_path)
    vol = load_series(tmp_path, irregular="resample")
    assert vol.array.shape == (4, 4, 5) and "missing" in vol.meta["resampled"]
    src = stored.transpose(1, 0, 2)[::-1, ::-1, :].astype(np.float32)
    np.testing.assert_allclose(vol.array[..., [0, 1, 3, 4]], src[..., [0, 1, 3, 4]])
    np.testing.assert_allclose(vol.array[..., 2], (src[..., 1] + src[..., 3]) / 2)  # linear in the gap


def test_non_uniform_spacing_is_named(tmp_path: Path) -> None:
    write_series(tmp_path, ramp(4, 4, 3), step=(0, 0, 2.0), extra={"ImagePositionPatient": lambda k: [
        0, 0, [0.0, 2.0, 5.0][k]]})
    with pytest.raises(InputError, match="non-uniform slice spacing"):
        load_series(tmp_path)
    vol = load_series(tmp_path, irregular="resample")  # 0..5 mm at 5/3 mm: gaps <= 2 mm, ends kept
    assert vol.array.shape == (4, 4, 4) and vol.spacing[2] == pytest.approx(5 / 3)


def test_gantry_tilt_is_refused_or_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    # a bright column at a fixed world position; each slice origin slides 1 pixel (1 mm) along +y (LPS)
    stored = np.zeros((8, 8, 4), np.uint16)
    for k in range(4):
        stored[4 - k, 3, k] = 1000  # row 4-k in slice k is world y = 4 mm (+k mm shift of the origin)
    write_series(tmp_path, stored, origin=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0), step=(0.0, 1.0, 2.0),
                 intercept=0.0)
    with pytest.raises(InputError, match="gantry tilt of 26.57 degrees"):
        load_series(tmp_path)
    vol = load_series(tmp_path, irregular="resample")
    assert "gantry tilt" in vol.meta["resampled"]
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.0], atol=1e-6)  # orthogonal slices now
    peaks = [np.unravel_index(np.argmax(vol.array[..., k]), vol.array.shape[:2]) for k in range(4)]
    assert len(set(peaks)) == 1  # the column is straight in the resampled grid


def test_image_without_patient_geometry_gets_identity_and_a_note(tmp_path: Path) -> None:
    files = write_series(tmp_path, ramp(4, 4, 1))
    import pydicom

    ds = pydicom.dcmread(files[0])
    del ds.ImageOrientationPatient, ds.ImagePositionPatient
    ds.save_as(files[0])
    vol = load_series(files[0])
    assert "assumed" in vol.meta["geometry"] and vol.array.shape == (4, 4, 1)
