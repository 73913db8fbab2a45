"""adapt / predict for segmentation: NIfTI in the input's geometry, DICOM-SEG referencing the source series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_series

from datasets.dicom import load_series, read_series
from datasets.labels import load_seg
from datasets.synth_decathlon import synthetic_case
from pipeline.common.config import to_dict, validate
from pipeline.common.run import save_weights
from pipeline.segmentation.adapt import adapt, predict
from pipeline.segmentation.output import write_dicom_seg
from pipeline.segmentation.train import build_model


def _series(folder: Path, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """A 24x20x8 CT-like DICOM series (oblique-free, LPS, anisotropic) and its liver mask (rows, cols, slices)."""
    image, label = synthetic_case(np.random.default_rng(seed), (24, 20, 8))
    stored = np.clip(image, 0, 3000).astype(np.uint16)
    return write_series(folder, stored, pixel_spacing=(1.5, 1.2), intercept=0.0, modality="MR"), label == 1


def test_dicom_seg_references_the_series_and_reads_back(tmp_path: Path) -> None:
    files, _ = _series(tmp_path / "series")
    volume = load_series(tmp_path / "series")
    mask = np.zeros(volume.array.shape, bool)
    mask[3:10, 4:12, 2:6] = True  # a known box on the canonical grid
    _, _, datasets = read_series(tmp_path / "series")
    out = tmp_path / "seg.dcm"
    write_dicom_seg(mask, volume.affine, list(datasets.values()), "liver", out)
    seg = hd.seg.segread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.meta["series_uid"]
    assert {str(s) for _, _, s in seg.get_source_image_uids()} == {str(d.SOPInstanceUID) for d in datasets.values()}
    back = load_seg(out, tmp_path / "series")
    assert np.array_equal(np.asarray(back.array) > 0, mask)
    assert np.allclose(back.affine, volume.affine)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """An (untrained) 2D prototype run directory: enough for adapt/predict plumbing."""
    import yaml

    transforms = {"preset": "mr", "spacing": None, "percentiles": [0.5, 99.5]}
    cfg = validate({"task": "segmentation", "transforms": transforms,
                    "segmentation": {"channels": [8, 16], "features": 8}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    save_weights(build_model(cfg), run / "model.safetensors")
    return run


def test_adapt_predict_nifti_keeps_input_geometry_and_dicom_gets_a_seg(tmp_path: Path, run_dir: Path) -> None:
    image, label = synthetic_case(np.random.default_rng(1), (22, 18, 10))
    lps = np.array([[-1.5, 0, 0, 30], [0, -1.2, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]])  # LPS-stored, anisotropic
    nib.save(nib.Nifti1Image(image, lps), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, lps), str(tmp_path / "lab.nii.gz"))
    (tmp_path / "support.csv").write_text("image,label\nimg.nii.gz,lab.nii.gz\n")
    summary = adapt(run_dir, tmp_path / "support.csv", tmp_path / "adapted", structure="1")
    assert summary["task"] == "segmentation" and summary["shots"] == 1
    series_files, _ = _series(tmp_path / "series", seed=2)
    rows = predict(tmp_path / "adapted", [tmp_path / "img.nii.gz", tmp_path / "series"], tmp_path / "pred")
    out = nib.load(rows[0]["nifti"])
    assert out.shape == image.shape and np.allclose(out.affine, lps)
    assert "dicom_seg" not in rows[0]
    volume = load_series(tmp_path / "series")
    out_dcm = nib.load(rows[1]["nifti"])
    assert out_dcm.shape == volume.array.shape and np.allclose(out_dcm.affine, volume.affine)
    seg = hd.seg.segread(rows[1]["dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.meta["series_uid"]
    back = load_seg(Path(rows[1]["dicom_seg"]), tmp_path / "series")
    assert np.array_equal(np.asarray(back.array) > 0, np.asarray(out_dcm.dataobj) > 0)
    assert len(series_files) == 8
