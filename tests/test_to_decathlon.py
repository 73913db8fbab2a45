"""`python -m pipeline decathlon`: a labelled DICOM tree -> a Decathlon training folder the segmentation and
registration rooms read."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.__main__ import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    assert main(["synth", str(out), "--patients", "3", "--seed", "2"]) == 0
    return out


def test_labelled_series_become_cases_with_one_label_table(cohort: Path, tmp_path: Path) -> None:
    from datasets.dicom import load_series
    from datasets.volume_io import read_sidecar
    from pipeline.common.config import load_config
    from pipeline.segmentation.data import load_cases

    out = tmp_path / "Task"
    assert main(["decathlon", str(cohort), "--out", str(out)]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["numTraining"] == 3 and spec["labels"]["0"] == "background"
    names = {v: int(k) for k, v in spec["labels"].items()}
    assert {"liver", "lesion", "lung_left"} <= set(names)
    # no patient ID anywhere: the case names are salted hashes
    assert not any("SYN" in p.name for p in out.rglob("*")) and "SYN" not in (out / "dataset.json").read_text()
    # each case: the series' image and its label map, renumbered into the folder's table, voxel for voxel
    for label_map in sorted(cohort.rglob("labels/*.nii.gz")):
        sidecar = read_sidecar(label_map)
        series = next(p for p in label_map.parent.parent.iterdir() if p.is_dir() and p.name != "labels")
        image = load_series(series)
        source_img = nib.as_closest_canonical(nib.load(str(label_map)))
        source = np.asarray(source_img.dataobj)
        match = [e for e in spec["training"] if nib.load(str(out / e["image"])).shape == image.array.shape
                 and np.allclose(np.asarray(nib.load(str(out / e["image"])).dataobj), image.array)]
        assert len(match) == 1, label_map
        written_img = nib.as_closest_canonical(nib.load(str(out / match[0]["label"])))
        assert np.allclose(written_img.affine, source_img.affine, atol=1e-3)  # the same grid, compared in RAS
        written = np.asarray(written_img.dataobj)
        for value, name in sidecar["label_names"].items():
            assert np.array_equal(written == names[name], source == int(value)), name
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "segment_decathlon_ssl.yaml",
                      [f"data.root={out}"])
    cases = load_cases(cfg)
    assert len(cases) == 3 and all("liver" in c.structures() for c in cases)


def test_refuses_a_tree_without_labels_and_an_existing_folder(cohort: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(cohort, bare, ignore=shutil.ignore_patterns("labels"))
    assert main(["decathlon", str(bare), "--out", str(tmp_path / "Task")]) == 2
    assert "no label object" in capsys.readouterr().err
    assert not (tmp_path / "Task").exists() and not list(tmp_path.glob(".Task*"))
    (tmp_path / "exists").mkdir()
    assert main(["decathlon", str(cohort), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_dicom_seg_labels_its_series(cohort: Path, tmp_path: Path) -> None:
    import shutil

    from datasets.dicom import load_series, read_series
    from datasets.labels import load_labels
    from pipeline.segmentation.output import write_dicom_seg

    tree = tmp_path / "tree"
    patient = sorted(p for p in cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(patient, tree / patient.name, ignore=shutil.ignore_patterns("labels"))
    series = next(p for p in (tree / patient.name).rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    label_map = next(patient.rglob("labels/*.nii.gz"))
    image = load_series(series)
    liver = np.asarray(load_labels(label_map, image=image, mismatch="resample").array) == 4  # liver in synth
    assert liver.any()
    _, _, datasets = read_series(series)
    write_dicom_seg(liver, image.affine, list(datasets.values()), "liver", tree / "seg.dcm")
    out = tmp_path / "Task"
    assert main(["decathlon", str(tree), "--out", str(out)]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == {"0": "background", "1": "liver"} and spec["numTraining"] == 1
    written = nib.load(str(out / spec["training"][0]["label"]))
    assert np.array_equal(np.asarray(written.dataobj) == 1, liver) and np.allclose(written.affine, image.affine)
