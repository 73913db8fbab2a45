"""Indexing a TCIA-style tree with NIfTI label maps and a findings CSV into a manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import ramp, write_series

from datasets import index as index_mod
from datasets.index import index_tree, patient_key, read_manifest, write_manifest
from pipeline.__main__ import main


def make_tree(root: Path) -> dict[str, str]:
    """Two patients, three series (one sagittal), one NIfTI label map with a sidecar, one stray file."""
    uids = {"s1": "1.2.826.1.1", "s2": "1.2.826.1.2", "s3": "1.2.826.1.3"}
    write_series(root / "P1" / "ST1" / "SE1", ramp(6, 5, 4), series_uid=uids["s1"], study_uid="1.2.826.9.1",
                 patient_id="PAT-A")
    write_series(root / "P1" / "ST1" / "SE2", ramp(8, 8, 3), series_uid=uids["s2"], study_uid="1.2.826.9.1",
                 patient_id="PAT-A", iop=(0, 1, 0, 0, 0, -1), modality="MR")
    write_series(root / "P2" / "ST2" / "SE3", ramp(4, 4, 2), series_uid=uids["s3"], study_uid="1.2.826.9.2",
                 patient_id="PAT-B")
    labels = root / "P1" / "ST1" / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 4), np.uint8), np.diag([0.7, 0.8, 2.0, 1.0])),
             labels / f"{uids['s1']}.nii.gz")
    (labels / f"{uids['s1']}.json").write_text(json.dumps({"series_uid": uids["s1"], "label_names": {"1": "x"}}))
    (root / "P2" / "README.txt").write_text("not an image")
    findings = root / "findings.csv"
    with open(findings, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "study_uid", "series_uid", "lesion_id", "lesion_type", "lps_x", "lps_y", "lps_z"])
        w.writerow(["PAT-A", "1.2.826.9.1", uids["s1"], "L1", "cyst", "1", "2", "3"])
        w.writerow(["PAT-A", "1.2.826.9.1", uids["s1"], "L2", "metastasis", "4", "5", "6"])
        w.writerow(["PAT-B", "", "", "L3", "cyst", "7", "8", "9"])  # joined through the patient key
    return uids


def test_index_rows_geometry_links_and_findings(tmp_path: Path) -> None:
    uids = make_tree(tmp_path / "tree")
    rows = index_tree(tmp_path / "tree", labels=tmp_path / "tree" / "findings.csv", salt="s")
    image_rows = [r for r in rows if r["kind"] == "dicom"]
    assert len(image_rows) == 4  # s1 twice (two findings), s2 once (none), s3 once (patient-level finding)
    by_uid = {r["series_uid"]: r for r in image_rows}
    s1 = by_uid[uids["s1"]]
    assert s1["shape"] == "5x6x4" and s1["spacing"] == "0.7x0.8x2" and s1["orientation"] == "LPS"
    assert s1["n_files"] == "4" and s1["modality"] == "CT" and Path(s1["path"]).name == "SE1"
    s2 = by_uid[uids["s2"]]  # sagittal: rows run A->P, columns S->I, slices L->R
    assert s2["orientation"] == "PIR" and s2["shape"] == "3x8x8" and s2["lesion_id"] == ""
    assert sorted(r["lesion_id"] for r in image_rows if r["series_uid"] == uids["s1"]) == ["L1", "L2"]
    assert by_uid[uids["s3"]]["lesion_id"] == "L3" and by_uid[uids["s3"]]["lps_z"] == "9"
    assert s1["patient_key"] == patient_key("PAT-A", "s") and s1["patient_key"] != patient_key("PAT-A", "t")
    for r in rows:
        assert "patient_id" not in r and "PAT-A" not in json.dumps(r) and "PAT-B" not in json.dumps(r)
    (nifti,) = [r for r in rows if r["kind"] == "nifti"]
    assert nifti["labels_for"] == uids["s1"] and nifti["shape"] == "5x6x4"
    assert json.loads(nifti["label_names"]) == {"1": "x"}


def test_raw_ids_only_when_asked_and_manifest_round_trip(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    rows = index_tree(tmp_path / "tree", labels=tmp_path / "tree" / "findings.csv", raw_ids=True)
    assert {r.get("patient_id") for r in rows if r["lesion_id"]} == {"PAT-A", "PAT-B"}
    out = tmp_path / "m.csv"
    write_manifest(rows, out)
    assert read_manifest(out) == rows
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_manifest_on_disk_names_series_by_key_and_locates_them_again(tmp_path: Path) -> None:
    """Folder names are patient IDs (P1, P2 here): the manifest holds series_key, the locator beside it the paths;
    a copy without locator is found again under its root, and a moved series is a clean error."""
    import shutil

    from datasets.index import locate
    from datasets.manifest import locator_of
    from datasets.volume import InputError

    tree = tmp_path / "tree"
    make_tree(tree)
    rows = index_tree(tree)
    out, bare = tmp_path / "m.csv", tmp_path / "run" / "m.csv"
    write_manifest(rows, out)
    write_manifest(rows, bare, locations="none")
    assert "path" not in out.read_text().splitlines()[0].split(",") and "/P1" not in out.read_text()
    assert locator_of(out).name == "m.paths.csv" and "/P1" in locator_of(out).read_text()
    assert read_manifest(out) == rows  # the locator puts every path back
    assert not locator_of(bare).exists() and all("path" not in r for r in read_manifest(bare))
    assert locate(read_manifest(bare), bare, tree) == rows
    with pytest.raises(InputError, match="data.root"):
        locate(read_manifest(bare), bare, None)
    shutil.move(tree / "P2", tmp_path / "elsewhere")
    with pytest.raises(InputError, match="not found in") as err:
        locate(read_manifest(bare), bare, tree)
    assert "m.csv" in str(err.value) and "P2" not in str(err.value)


def test_incremental_cache_and_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "tree")
    cache = tmp_path / "cache.json"
    first = index_tree(tmp_path / "tree", cache=cache)
    calls: list[Path] = []
    real = index_mod.summarise_file
    monkeypatch.setattr(index_mod, "summarise_file", lambda p, s: calls.append(p) or real(p, s))
    assert index_tree(tmp_path / "tree", cache=cache) == first and calls == []
    touched = sorted((tmp_path / "tree" / "P2" / "ST2" / "SE3").iterdir())[0]
    touched.write_bytes(touched.read_bytes())  # same content, new mtime: re-read just this file
    import os

    os.utime(touched, ns=(1, 1))
    assert index_tree(tmp_path / "tree", cache=cache) == first and calls == [touched]
    monkeypatch.undo()
    assert index_tree(tmp_path / "tree", workers=2) == first


def test_index_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tree(tmp_path / "tree")
    out = tmp_path / "out" / "manifest.csv"
    assert main(["index", str(tmp_path / "tree"), "--labels", str(tmp_path / "tree" / "findings.csv"),
                 "--out", str(out)]) == 0
    assert len(read_manifest(out)) == 5
    assert main(["index", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_decathlon_dataset_json_links_labels_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    for name in ("spleen_1", "spleen_2"):
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.int16), affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.int16), affine), root / "imagesTs" / "spleen_3.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"}
                     for i in (1, 2)],
        "test": ["./imagesTs/spleen_3.nii.gz"]}))
    rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in index_tree(root)}
    assert len(rows) == 5
    label = rows["labelsTr/spleen_2.nii.gz"]
    assert label["labels_for"] == rows["imagesTr/spleen_2.nii.gz"]["series_key"] and label["split"] == "train"
    assert json.loads(label["label_names"]) == {"0": "background", "1": "spleen"}
    assert rows["imagesTs/spleen_3.nii.gz"]["split"] == "test" and rows["imagesTr/spleen_1.nii.gz"]["modality"] == "CT"
    assert rows["imagesTr/spleen_1.nii.gz"]["spacing"] == "0.8x0.8x5"


@pytest.mark.realdata
def test_seg_and_rtstruct_rows_link_to_their_series(shared_data: Path, tmp_path: Path) -> None:
    rows = index_tree(shared_data / "dcmqi_seg", cache=tmp_path / "c.json")
    (image,) = [r for r in rows if r["kind"] == "dicom"]
    segs = [r for r in rows if r["kind"] == "seg"]
    assert image["shape"] == "512x512x3" and len(segs) == 2
    assert all(r["labels_for"] == image["series_uid"] for r in segs)
    assert {json.loads(r["label_names"])["1"] for r in segs} == {"Liver", "GREEN"}
    rt = [r for r in index_tree(shared_data / "rtutils_phantom") if r["kind"] == "rtstruct"]
    assert len(rt) == 3 and sum(bool(r["labels_for"]) for r in rt) == 2  # one has no series reference


def test_patient_ids_inside_other_finding_columns_are_pseudonymised(tmp_path: Path) -> None:
    """TCIA-style lesion ids embed the patient ID ("SYN0001-L1"): without --raw-ids the manifest holds the salted
    key there too, and no column but the file path names the patient."""
    from datasets.index import index_tree, patient_key
    from pipeline.__main__ import main

    assert main(["synth", str(tmp_path / "c"), "--patients", "2", "--seed", "3"]) == 0
    rows = index_tree(tmp_path / "c", labels=tmp_path / "c" / "findings.csv", salt="s")
    lesions = [r for r in rows if r.get("lesion_id")]
    assert lesions and all("SYN" not in v for r in rows for k, v in r.items() if k != "path")
    assert lesions[0]["lesion_id"].startswith(patient_key("SYN0001", "s")) or \
        lesions[0]["lesion_id"].startswith(patient_key("SYN0002", "s"))
    raw = index_tree(tmp_path / "c", labels=tmp_path / "c" / "findings.csv", salt="s", raw_ids=True)
    assert any(r.get("lesion_id", "").startswith("SYN") for r in raw)
