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
from pipeline.segmentation.output import segment_codes, write_dicom_seg, write_prediction
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


def test_nifti_and_dicom_seg_of_one_prediction_agree_voxel_for_voxel(tmp_path: Path) -> None:
    """A mask on a resampled prepared grid that reaches every border face: the NIfTI and the SEG written for the
    DICOM input hold the same voxels (they disagreed on the border faces when each resampled on its own)."""
    from pipeline.segmentation.data import make_case
    from transforms.config import TransformConfig

    _series(tmp_path / "series")
    volume = load_series(tmp_path / "series")
    case = make_case("q", volume, None, {}, TransformConfig(preset="mr", spacing=[1.0, 1.0, 1.7]))
    assert case.image.shape != volume.array.shape  # a resampled grid, as `transforms.spacing` gives
    mask = np.ones(case.image.shape, bool)
    row = write_prediction(mask, case.affine, tmp_path / "series", volume, tmp_path / "pred_00", "liver")
    nifti = np.asarray(nib.load(row["nifti"]).dataobj) > 0
    seg = np.asarray(load_seg(Path(row["dicom_seg"]), tmp_path / "series").array) > 0
    assert nifti.shape == seg.shape and nifti.sum() == row["voxels"] > 0
    assert np.array_equal(nifti, seg)


def test_segment_codes_come_from_the_structure_name() -> None:
    category, kind, side = segment_codes("liver")
    assert (category.meaning, kind.value, side) == ("Anatomical Structure", "10200004", None)
    _, kind, side = segment_codes("kidney_left")
    assert kind.meaning == "Kidney" and side.meaning == "Left"
    assert segment_codes("Right kidney")[2].meaning == "Right"
    category, kind, _ = segment_codes("liver_tumor")
    assert category.meaning == "Morphologically Abnormal Structure" and kind.meaning == "Neoplasm"
    assert segment_codes("7")[1].meaning == "Anatomical Structure"  # unknown: generic, the label carries the name
    _, kind, _ = segment_codes("roi_a", {"roi_a": "SCT:41216001:Prostate"})
    assert (kind.scheme_designator, kind.value, kind.meaning) == ("SCT", "41216001", "Prostate")
    with pytest.raises(Exception, match="SCHEME:VALUE:MEANING"):
        segment_codes("roi_a", {"roi_a": "Prostate"})


def test_dicom_seg_carries_the_coded_structure(tmp_path: Path) -> None:
    _series(tmp_path / "series")
    volume = load_series(tmp_path / "series")
    _, _, datasets = read_series(tmp_path / "series")
    write_dicom_seg(np.ones(volume.array.shape, bool), volume.affine, list(datasets.values()), "kidney_right",
                    tmp_path / "seg.dcm")
    item = hd.seg.segread(tmp_path / "seg.dcm").SegmentSequence[0]
    assert item.SegmentLabel == "kidney_right"
    assert item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"  # Kidney
    modifier = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeMeaning == "Right"


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


def test_adapt_reads_structure_names_from_the_label_sidecar(tmp_path: Path, run_dir: Path) -> None:
    """A label map with fewscan's JSON sidecar (as `synth` and `convert` write): `--structure liver` finds value 2
    through it (it answered "no structure 'liver' in the labels (names: [])")."""
    import json

    from datasets.labels import load_labels
    from pipeline.segmentation.adapt import _structure_mask

    image, label = synthetic_case(np.random.default_rng(3), (22, 18, 10))
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    (tmp_path / "lab.json").write_text(json.dumps({"label_names": {"1": "kidney", "2": "liver", "3": "spleen"}}))
    loaded = load_labels(tmp_path / "lab.nii.gz")
    assert loaded.meta["label_names"]["2"] == "liver"
    mask = _structure_mask(loaded, "liver", tmp_path / "lab.nii.gz")
    assert mask.any() and np.array_equal(mask, np.asarray(label) == 2)
    (tmp_path / "support.csv").write_text("image,label\nimg.nii.gz,lab.nii.gz\n")
    summary = adapt(run_dir, tmp_path / "support.csv", tmp_path / "adapted", structure="liver")
    assert summary["structure"] == "liver" and summary["shots"] == 1
