"""Synthetic Decathlon folders (`datasets.synth_decathlon`): seeded, byte-for-byte reproducible, Decathlon layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.sources import read_decathlon
from datasets.synth_decathlon import write_synthetic_organs, write_synthetic_subjects


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_organ_folder_is_reproducible_and_lists_unlabelled_scans_as_test(tmp_path: Path) -> None:
    args = {"n_cases": 3, "shape": (10, 12, 8), "seed": 4, "spacing": (1.0, 1.5, 2.0), "unlabelled": 2}
    a, b = write_synthetic_organs(tmp_path / "a", **args), write_synthetic_organs(tmp_path / "b", **args)
    assert _files(a) == _files(b)
    assert _files(a) != _files(write_synthetic_organs(tmp_path / "c", **{**args, "seed": 5}))
    spec = json.loads((a / "dataset.json").read_text())
    assert list(spec) == ["name", "modality", "labels", "numTraining", "numTest", "training", "test"]
    assert (spec["numTraining"], spec["numTest"]) == (3, 2) and spec["test"] == ["./imagesTs/synth_003.nii.gz",
                                                                                  "./imagesTs/synth_004.nii.gz"]
    label = nib.load(a / "labelsTr" / "synth_000.nii.gz")
    assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}
    np.testing.assert_allclose(label.header.get_zooms(), (1.0, 1.5, 2.0))
    assert len(read_decathlon(a).cases) == 5


def test_subject_folder_is_reproducible_and_has_no_test_section(tmp_path: Path) -> None:
    args = {"n_cases": 3, "shape": (8, 9, 7), "seed": 1, "name": "Liver", "modality": "CT"}
    a, b = write_synthetic_subjects(tmp_path / "a", **args), write_synthetic_subjects(tmp_path / "b", **args)
    assert _files(a) == _files(b)
    assert not (a / "imagesTs").exists()
    spec = json.loads((a / "dataset.json").read_text())
    assert list(spec) == ["name", "modality", "labels", "numTraining", "training", "test"]
    assert spec["name"] == "Liver" and spec["modality"] == {"0": "CT"} and spec["test"] == []
    image = nib.load(a / "imagesTr" / "synth_002.nii.gz")
    assert image.get_data_dtype() == np.float32 and image.shape == (8, 9, 7)
