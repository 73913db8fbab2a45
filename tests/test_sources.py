"""Data sources: npz (MedMNIST keys and images/labels/groups), class-per-folder PNG and NIfTI, Decathlon, TCIA."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from datasets.sources import (
    load_label_map,
    load_npz,
    read_decathlon,
    read_label_names,
    structure_centre,
    structure_tasks,
)
from datasets.volume import FewscanError, InputError, Volume
from pipeline.classification.data import open_source
from pipeline.classification.episodes import EpisodeSampler
from pipeline.common.config import validate


def cfg_for(source: str, root: Path, **extra: object) -> object:
    raw = {"data": {"source": source, "root": str(root)}, **extra}
    return validate(raw)


def write_medmnist(path: Path, rgb: bool = False) -> None:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for part, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{part}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{part}_labels"] = (np.arange(n) % 3).reshape(n, 1)  # MedMNIST labels are (n, 1)
    np.savez(path, **arrays)


def test_npz_medmnist_keys_pool_parts_into_2d_items(tmp_path: Path) -> None:
    write_medmnist(tmp_path / "m.npz", rgb=True)
    arrays = load_npz(tmp_path / "m.npz")
    assert arrays.images.shape == (22, 3, 28, 28)  # channels-last RGB moved to channels-first
    assert arrays.ids[0] == "train#0" and arrays.ids[-1] == "test#5"
    only_train = load_npz(tmp_path / "m.npz", parts=["train"])
    assert len(only_train.labels) == 12
    src = open_source(cfg_for("npz", tmp_path / "m.npz"))
    assert src.classes == ["0", "1", "2"]
    items = src.items(["1", "2"])
    assert items.x.shape == (len(items.labels), 3, 28, 28) and set(items.labels) == {"1", "2"}
    assert 0.0 <= float(items.x.min()) and float(items.x.max()) <= 1.0
    # without groups every image is its own group (a pseudonymised key, not the raw id)
    assert len(set(items.groups)) == len(items.labels) and "train#1" not in items.groups


def test_npz_images_labels_groups_and_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 16, 16), dtype=np.uint8)
    labels = np.arange(30) % 3
    groups = np.array([f"patient{i // 3}" for i in range(30)])  # 3 images per patient
    np.savez(tmp_path / "g.npz", images=images, labels=labels, groups=groups,
             class_names=np.array(["cat_a", "cat_b", "cat_c"]))
    src = open_source(cfg_for("npz", tmp_path / "g.npz", transforms={"image_size": [8, 8]}))
    assert src.classes == ["cat_a", "cat_b", "cat_c"]
    items = src.items()
    assert items.x.shape == (30, 1, 8, 8)
    assert len(set(items.groups)) == 10 and not any(g.startswith("patient") for g in items.groups)
    assert items.groups[0] == items.groups[2] != items.groups[3]
    np.testing.assert_allclose(items.x[0, 0].mean().item(), images[0].mean() / 255, atol=0.05)
    # patient-disjoint episodes come out of it
    ep = EpisodeSampler(items.labels, items.groups, src.classes, 3, 1, 1, seed=0).sample()
    assert not {items.groups[i] for i in ep.support} & {items.groups[i] for i in ep.query}


def test_npz_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4, 4)), labels=np.zeros((2,), int))
    with pytest.raises(InputError, match="3 images but 2 labels"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "multi.npz", images=np.zeros((3, 4, 4)), labels=np.zeros((3, 5), int))
    with pytest.raises(InputError, match="single-label"):
        load_npz(tmp_path / "multi.npz")
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="arrays present"):
        load_npz(tmp_path / "none.npz")


def test_folder_of_pngs_with_patient_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for cls in ("benign", "malignant"):
        for p in range(3):
            for k in range(2):
                path = tmp_path / cls / f"pt{p}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(path)
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    src = open_source(cfg_for("folder", tmp_path, transforms={"image_size": [16, 16]}))
    assert src.classes == ["benign", "malignant"]
    items = src.items()
    assert items.x.shape == (12, 1, 16, 16)
    # ids name class and file, but the patient folder only by its pseudonymised key
    assert items.ids[0] == f"benign/{items.groups[0]}/0.png" and not any("pt0" in i for i in items.ids)
    assert len(set(items.groups)) == 3  # pt0..pt2: the same patient folder name under both classes
    # without image_size, differently sized images are refused with the file named
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "malignant" / "pt0" / "odd.png")
    with pytest.raises(InputError, match="image_size"):
        open_source(cfg_for("folder", tmp_path)).items()


def test_folder_of_nifti_patches_goes_through_the_volume_preset(tmp_path: Path) -> None:
    for cls, hu in (("fat", -100.0), ("bone", 700.0)):
        for k in range(3):
            path = tmp_path / cls / f"case{k}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.full((6, 6, 6), hu, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    src = open_source(cfg_for("folder", tmp_path, transforms={"roi_size": [8, 8, 8], "ct_window": "bone"}))
    items = src.items()
    assert items.x.shape == (6, 1, 8, 8, 8)  # 6 voxels at 2 mm -> ~11 at 1 mm, centre-cropped to 8
    bone = items.x[[i for i, c in enumerate(items.labels) if c == "bone"]]
    fat = items.x[[i for i, c in enumerate(items.labels) if c == "fat"]]
    assert float(bone.mean()) > float(fat.mean())  # bone window (-500, 1300): 700 HU > -100 HU


def write_decathlon(root: Path, n_cases: int = 4) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for c in range(n_cases):
        img = np.full((12, 12, 8), -50.0, np.float32)
        lab = np.zeros((12, 12, 8), np.uint8)
        lab[2:5, 2:5, 2:5] = 1  # liver
        img[lab == 1] = 60.0
        if c % 2 == 0:
            lab[7:10, 7:10, 3:6] = 2  # tumour in half the cases
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / f"toy_{c}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"toy_{c}.nii.gz")
        training.append({"image": f"./imagesTr/toy_{c}.nii.gz", "label": f"./labelsTr/toy_{c}.nii.gz"})
    spec = {"name": "Toy", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(spec))


def test_decathlon_reader_and_structure_patches(tmp_path: Path) -> None:
    write_decathlon(tmp_path)
    ds = read_decathlon(tmp_path)
    assert ds.name == "Toy" and ds.primary_modality == "CT" and len(ds.cases) == 4
    assert ds.label_names == {0: "background", 1: "liver", 2: "tumour"}
    assert [t.name for t in structure_tasks(ds.label_names)] == ["liver", "tumour"]
    src = open_source(cfg_for("decathlon", tmp_path, transforms={"roi_size": [6, 6, 6], "ct_window": "soft_tissue"}))
    assert src.classes == ["liver", "tumour"]
    items = src.items()
    assert items.labels.count("liver") == 4 and items.labels.count("tumour") == 2
    assert items.x.shape == (6, 1, 6, 6, 6)
    liver = items.x[items.labels.index("liver")]
    # centred on the liver centroid: the middle voxel is liver, 60 HU in the soft-tissue window (-160, 240) = 0.55
    # (-50 HU background would be 0.275: an off-centre crop fails here)
    assert abs(float(liver[0, 3, 3, 3]) - 0.55) < 0.02
    assert len(set(items.groups)) == 4 and "toy_0" not in items.groups


def test_decathlon_missing_file_is_named(tmp_path: Path) -> None:
    write_decathlon(tmp_path, n_cases=2)
    (tmp_path / "labelsTr" / "toy_1.nii.gz").unlink()
    with pytest.raises(InputError, match="toy_1.nii.gz.*missing"):
        read_decathlon(tmp_path)


def test_label_tables_and_structure_centre(tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text(json.dumps({"total": {"1": "spleen", "2": "liver"}, "total_mr": {"1": "a"}}))
    with pytest.raises(InputError, match="pick one"):
        read_label_names(tmp_path / "map.json")
    assert read_label_names(tmp_path / "map.json", "total") == {1: "spleen", 2: "liver"}
    (tmp_path / "nnunet.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1}}))
    assert read_label_names(tmp_path / "nnunet.json") == {0: "background", 1: "kidney"}
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[1, 2, 3] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "lab.nii.gz")
    vol = load_label_map(tmp_path / "lab.nii.gz", {2: "liver"})
    assert vol.meta["label_names"] == {2: "liver"}
    np.testing.assert_allclose(structure_centre(vol, 2), [2.0, 4.0, 6.0])
    assert structure_tasks({0: "bg", 1: "spleen", 2: "liver"}, present=[2]) == [structure_tasks({2: "liver"})[0]]
    with pytest.raises(ValueError):
        structure_centre(Volume(lab, affine), 9)


def test_tcia_source_from_synthetic_cohort(tmp_path: Path) -> None:
    synth = pytest.importorskip("datasets.synth")
    if not hasattr(synth, "write_cohort"):
        pytest.skip("datasets.synth.write_cohort is not written yet")
    synth.write_cohort(tmp_path / "data", seed=0, n_patients=4)
    cfg = cfg_for("tcia", tmp_path / "data", transforms={"roi_size": [8, 8, 8], "spacing": [2.0, 2.0, 2.0]})
    src = open_source(cfg)
    assert src.classes and set(src.catalog().labels) == set(src.classes)
    items = src.items(src.classes[:2])
    assert items.x.shape[1:] == (1, 8, 8, 8) and set(items.labels) <= set(src.classes[:2])
    assert sorted(items.ids) == sorted(src.catalog(src.classes[:2]).ids)


def test_unknown_structure_names_are_refused(tmp_path: Path) -> None:
    write_decathlon(tmp_path, n_cases=2)
    with pytest.raises(FewscanError, match="not in the label table"):
        open_source(cfg_for("decathlon", tmp_path, data={"source": "decathlon", "root": str(tmp_path),
                                                         "structures": ["spleen"]}))


@pytest.mark.realdata
def test_totalsegmentator_label_maps_give_one_task_per_organ_present(shared_data: Path) -> None:
    from datasets.sources import label_counts, load_nifti

    root = shared_data / "totalsegmentator_example"
    if not (root / "class_map_total.json").is_file():
        pytest.skip(f"{root} lacks class_map_total.json")
    for seg, table, n_labels in (("example_seg.nii.gz", "total", 41), ("example_seg_mr.nii.gz", "total_mr", 23)):
        names = read_label_names(root / "class_map_total.json", table)
        label = load_label_map(root / seg, names)
        assert label.orientation == "RAS"  # the MR file is stored LPS; loaders canonicalise
        present = label_counts(label.array)
        tasks = structure_tasks(label.meta["label_names"], present=present)
        assert len(tasks) == len(present) == n_labels
        assert len({t.name for t in tasks}) == n_labels and all(t.name == names[t.value] for t in tasks)
    # the CT liver task is centred on liver tissue: the image at its world centroid reads soft-tissue HU
    names = read_label_names(root / "class_map_total.json", "total")
    label = load_label_map(root / "example_seg.nii.gz", names)
    liver = next(t for t in structure_tasks(names, label_counts(label.array)) if t.name == "liver")
    image = load_nifti(root / "example_ct_sm.nii.gz")
    ijk = np.round(np.linalg.inv(image.affine) @ np.append(structure_centre(label, liver.value), 1)).astype(int)[:3]
    assert 20 < image.array[tuple(ijk)] < 200
