"""`python -m pipeline convert`: NIfTI out with dcm2niix-equivalent values and geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import ramp, write_series

from datasets.dicom import load_series
from pipeline.__main__ import main


def test_convert_series_round_trips_values_and_world_geometry(tmp_path: Path) -> None:
    write_series(tmp_path / "s", ramp(6, 5, 4), iop=(0, 1, 0, 0, 0, -1), intercept=-1024.0)
    out = tmp_path / "out" / "ct.nii.gz"
    assert main(["convert", str(tmp_path / "s"), str(out)]) == 0
    img = nib.load(out)
    vol = load_series(tmp_path / "s")
    assert img.get_data_dtype() == np.int16  # integer HU stored exactly, as dcm2niix does
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array)
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    side = json.loads((tmp_path / "out" / "ct.json").read_text())
    assert side["modality"] == "CT" and side["source_orientation"] == "PIR" and "PAT-001" not in json.dumps(side)


def test_convert_4d_and_series_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for t in range(2):
        write_series(tmp_path / "fmri", ramp(4, 4, 3, seed=t), series_uid="1.2.3.7", prefix=f"v{t}",
                     extra={"AcquisitionNumber": t + 1}, modality="MR", slope=0.5, intercept=0.0)
    write_series(tmp_path / "fmri" / "other", ramp(4, 4, 2), series_uid="1.2.3.8")
    out = tmp_path / "bold.nii"
    assert main(["convert", str(tmp_path / "fmri"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 series" in err and "1.2.3.7" in err and "1.2.3.8" in err and not out.exists()
    assert main(["convert", str(tmp_path / "fmri"), str(out), "--series", "1.2.3.7"]) == 0
    img = nib.load(out)
    assert img.shape == (4, 4, 3, 2) and img.get_data_dtype() == np.float32  # slope 0.5: halves
    expected = (ramp(4, 4, 3, seed=1) * 0.5).transpose(1, 0, 2)[::-1, ::-1]
    np.testing.assert_array_equal(np.asarray(img.dataobj)[..., 1], expected)


@pytest.mark.realdata
def test_convert_mosaic_equals_dcm2niix_reference(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "9.nii.gz"
    assert main(["convert", str(shared_data / "dcm_qa_ts" / "In" / "9.dcm"), str(out)]) == 0
    ours, ref = nib.load(out), nib.load(shared_data / "dcm_qa_ts" / "Ref" / "9.nii")
    # compare in world space: map our voxel grid into the reference's
    to_ref = np.linalg.solve(ref.affine, ours.affine)
    assert np.allclose(np.abs(to_ref[:3, :3]), np.eye(3), atol=1e-4)
    ref_data = np.asarray(ref.dataobj)
    flips = [slice(None, None, -1) if to_ref[i, i] < 0 else slice(None) for i in range(3)]
    np.testing.assert_array_equal(np.asarray(ours.dataobj), ref_data[tuple(flips)])


@pytest.mark.realdata
def test_convert_seg_with_reference(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "dcmqi_seg" / "data" / "segmentations"
    out = tmp_path / "seg.nii.gz"
    assert main(["convert", str(root / "partial_overlaps.dcm"), str(out), "--reference", str(root / "ct-3slice"),
                 "--masks"]) == 0
    img = nib.load(out)
    assert img.shape == (512, 512, 3, 5) and img.get_data_dtype() == np.uint8
    names = json.loads((tmp_path / "seg.json").read_text())["label_names"]
    assert names["1"] == "GREEN" and len(names) == 5


def test_write_nifti_header_dtype_sidecar_and_nothing_left_on_failure(tmp_path: Path, monkeypatch) -> None:
    from datasets.volume import Volume
    from datasets.volume_io import write_nifti

    affine = np.array([[-0.8, 0, 0, 10], [0, 0.9, 0.1, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    vol = Volume(np.arange(24, dtype=np.float64).reshape(2, 3, 4), affine, {"modality": "CT"})
    out = write_nifti(vol, tmp_path / "a.nii.gz", dtype=np.uint8)
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8 and int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array)
    assert not (tmp_path / "a.json").exists()  # sidecars only when asked
    write_nifti(vol, tmp_path / "b.nii", sidecar=True)
    assert nib.load(tmp_path / "b.nii").get_data_dtype() == np.float64
    assert json.loads((tmp_path / "b.json").read_text()) == {"modality": "CT"}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError):
        write_nifti(vol, tmp_path / "c.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.json", "b.nii"]
