"""Bad input through the CLI: one line naming the file and the reason, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import ramp, square, write_rtstruct, write_series

from pipeline.__main__ import main


def run_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    out = tmp_path / "out" / "x.nii.gz"
    assert main(["convert", *args, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fewscan convert: error: ")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half-written
    return err


def test_truncated_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (f,) = write_series(tmp_path / "s", ramp(64, 64, 1))
    f.write_bytes(f.read_bytes()[:3000])
    err = run_convert(tmp_path, capsys, str(f))
    assert str(f) in err and ("truncated" in err or "cannot decode" in err)


def test_text_file_named_dcm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.dcm"
    f.write_text("this is not DICOM\n")
    assert "notes.dcm: not a readable DICOM image file" in run_convert(tmp_path, capsys, str(f))


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert "empty: no DICOM image files found" in run_convert(tmp_path, capsys, str(tmp_path / "empty"))


def test_rtstruct_given_as_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_series(tmp_path / "ct", ramp(6, 6, 2), origin=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0))
    write_rtstruct(tmp_path / "rt" / "rt.dcm", files, [(1, 0, square(1, 1, 3, 3, 0))])
    assert "rt.dcm: a RTSTRUCT needs its image series" in run_convert(tmp_path, capsys, str(tmp_path / "rt" / "rt.dcm"))
    assert "rt: holds no image, only ['RTSTRUCT']" in run_convert(tmp_path, capsys, str(tmp_path / "rt"))


def test_nan_filled_nifti(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    assert "nan.nii.gz: image holds no finite values" in run_convert(tmp_path, capsys, str(tmp_path / "nan.nii.gz"))


def test_label_with_other_geometry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path / "ct", ramp(6, 5, 4))
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 3), np.uint8), np.diag([0.7, 0.8, 2.0, 1.0])), tmp_path / "lab.nii.gz")
    err = run_convert(tmp_path, capsys, str(tmp_path / "lab.nii.gz"), "--reference", str(tmp_path / "ct"))
    assert "lab.nii.gz: geometry differs from its image" in err


def test_atomic_outputs_get_umask_permissions_and_vanish_on_failure(tmp_path: Path) -> None:
    """Outputs are written beside the target and renamed: on success they carry the usual permissions (not
    mkstemp's 0600, which hid predictions from colleagues in a shared folder), on failure nothing is left."""
    import os

    from datasets.volume import atomic_path

    mask = os.umask(0o022)
    os.umask(mask)
    with atomic_path(tmp_path / "out" / "pred.nii.gz") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "out" / "pred.nii.gz").stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out" / "other.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pred.nii.gz"]
