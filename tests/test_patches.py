"""Organ patches (`transforms/patches.py`, `python -m pipeline patches`): centres on their structure, pseudo-patient
slab groups that never overlap, npz readable by the npz source, seeded, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.volume import FewscanError
from pipeline.__main__ import main
from pipeline.classification.data import open_source
from pipeline.common.config import validate
from transforms.patches import load_subject, organ_patches, write_patches

HU = {1: 60.0, 2: -60.0, 3: 160.0, 4: 100.0}  # liver, spleen, kidney, tiny: distinct in the soft-tissue window
NAMES = {1: "liver", 2: "spleen", 3: "kidney", 4: "tiny"}
VALUE = {name: value for value, name in NAMES.items()}
SOFT_TISSUE = (-160.0, 240.0)


def write_subject(folder: Path, shape: tuple[int, int, int] = (40, 36, 12),
                  spacing: float = 1.5) -> tuple[Path, Path, Path]:
    """A CT-like volume (`spacing` x `spacing` x 5 mm, first axis stored flipped) with three boxes spanning all
    slices and a fourth structure in one slice only; returns image, label map and name-table paths."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(shape, np.int16)
    labels[4:16, 4:30, :] = 1
    labels[20:30, 6:18, :] = 2
    labels[22:36, 22:32, :] = 3
    labels[30:36, 4:10, 5] = 4
    image = np.full(shape, -1000.0, np.float32)
    for value, hu in HU.items():
        image[labels == value] = hu
    affine = np.diag([-spacing, spacing, 5.0, 1.0])
    affine[:3, 3] = [30.0, -20.0, 100.0]
    nib.save(nib.Nifti1Image(image, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "seg.nii.gz")
    (folder / "names.json").write_text(json.dumps({str(k): v for k, v in NAMES.items()}))
    return folder / "ct.nii.gz", folder / "seg.nii.gz", folder / "names.json"


def to_hu(pixels: np.ndarray) -> np.ndarray:
    low, high = SOFT_TISSUE
    return low + np.asarray(pixels, float) / 255.0 * (high - low)


def test_patch_centres_carry_their_label_and_groups_never_overlap(tmp_path: Path) -> None:
    image, seg, names = write_subject(tmp_path)
    subject = load_subject(image, seg, NAMES)
    assert subject.modality == "CT"  # guessed from air at -1000
    patches = organ_patches([subject], size=16, slab_mm=15.0, per_group=5, min_groups=3, min_voxels=10)
    assert patches.class_names == ["kidney", "liver", "spleen"]  # "tiny" is in one slab only: left out
    assert patches.images.shape[1:] == (16, 16) and patches.images.dtype == np.uint8
    by_name = {n: HU[v] for v, n in NAMES.items()}
    lab = nib.load(seg)
    to_voxel = np.linalg.inv(lab.affine)
    stored = np.asarray(lab.dataobj)
    for k, name in enumerate(patches.class_names):
        sel = patches.labels == k
        assert len(set(patches.groups[sel])) == 4  # 60 mm of slices in 15 mm slabs
        np.testing.assert_allclose(to_hu(patches.images[sel, 8, 8]), by_name[name], atol=1.0)  # centre pixel
        ijk = np.rint(to_voxel @ np.c_[patches.centres[sel], np.ones(sel.sum())].T)[:3].astype(int)
        assert (stored[tuple(ijk)] == VALUE[name]).all()
    # groups are (subject, slab): all their patches lie in one slab, and slabs of different groups are disjoint
    z_ranges = sorted((patches.centres[patches.groups == g, 2].min(), patches.centres[patches.groups == g, 2].max())
                      for g in set(patches.groups))
    assert all(hi - lo < 15.0 for lo, hi in z_ranges)
    assert all(a[1] < b[0] for a, b in zip(z_ranges, z_ranges[1:], strict=False))
    # slab 0 / None: one group per subject (real patients)
    whole = organ_patches([subject], size=16, slab_mm=None, per_group=5, min_groups=1)
    assert set(whole.groups) == {"s0/z00"} and "tiny" in whole.class_names


def test_radiological_orientation_of_the_patches(tmp_path: Path) -> None:
    image, seg, names = write_subject(tmp_path)
    patches = organ_patches([load_subject(image, seg, NAMES)], size=16, slab_mm=60, per_group=50, min_groups=1,
                            structures=["liver"])
    # the voxel left of the centre on screen is the patient's right (+x), the one above is anterior (+y)
    nii = nib.load(image)
    data, inv = np.asarray(nii.dataobj), np.linalg.inv(nii.affine)
    for centre, patch in zip(patches.centres, patches.images, strict=True):
        for offset, pixel in (([1.5, 0, 0], patch[8, 7]), ([0, 1.5, 0], patch[7, 8])):
            i, j, k = np.rint(inv @ np.append(centre + offset, 1))[:3].astype(int)
            if 0 <= i < data.shape[0] and 0 <= j < data.shape[1]:
                assert abs(to_hu(pixel) - np.clip(data[i, j, k], *SOFT_TISSUE)) < 1.0


def test_npz_loads_through_the_npz_source_and_is_seeded(tmp_path: Path) -> None:
    image, seg, names = write_subject(tmp_path)
    subject = load_subject(image, seg, NAMES)
    kwargs = {"size": 16, "slab_mm": 15.0, "per_group": 4, "min_groups": 3}
    first = write_patches(organ_patches([subject], seed=3, **kwargs), tmp_path / "a.npz")
    again = write_patches(organ_patches([subject], seed=3, **kwargs), tmp_path / "b.npz")
    other = write_patches(organ_patches([subject], seed=4, **kwargs), tmp_path / "c.npz")
    a, b, c = (dict(np.load(p)) for p in (first, again, other))
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["centres"], c["centres"])
    cfg = validate({"data": {"source": "npz", "root": str(first)}, "split": {"novel": ["kidney"]}})
    src = open_source(cfg)
    assert src.classes == ["kidney", "liver", "spleen"]
    items = src.items()
    assert items.x.shape == (len(a["labels"]), 1, 16, 16) and len(set(items.groups)) == 4
    assert 0.0 <= float(items.x.min()) and float(items.x.max()) <= 1.0


def test_cli_writes_the_npz_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, seg, names = write_subject(tmp_path / "a")
    out = tmp_path / "out" / "organs.npz"
    common = ["patches", "--image", str(image), "--labels", str(seg), "--names", str(names), "--size", "16",
              "--min-groups", "3"]
    assert main([*common, "--out", str(out)]) == 0
    assert "kidney" in capsys.readouterr().out and out.is_file()

    def refused(args: list[str], expected: str) -> None:
        bad = tmp_path / "bad" / "x.npz"
        assert main(args + ["--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fewscan patches: error: ") and expected in err, err
        assert not bad.parent.exists() or list(bad.parent.iterdir()) == []

    other = write_subject(tmp_path / "b", spacing=2.0)[1]
    refused(["patches", "--image", str(image), "--labels", str(other), "--names", str(names)], "does not match")
    refused([*common, "--structures", "liver,pancreas"], "not in any label-name table: ['pancreas']")
    (tmp_path / "few.json").write_text(json.dumps({"1": "liver"}))
    refused(["patches", "--image", str(image), "--labels", str(seg), "--names", str(tmp_path / "few.json")],
            "label values [2, 3, 4] have no name")
    refused([*common, "--image", str(image)], "2 --image but 1 --labels")
    refused([*common, "--min-groups", "9"], "no structure is present in >= 9")
    with pytest.raises(FewscanError, match="modality"):
        load_subject(image, seg, NAMES, modality="PET")


@pytest.mark.realdata
def test_totalsegmentator_organ_patches(shared_data: Path) -> None:
    from transforms.patches import read_names

    root = shared_data / "totalsegmentator_example"
    table = f"{root / 'class_map_total.json'}:total"
    ct = organ_patches([load_subject(root / "example_ct_sm.nii.gz", root / "example_seg.nii.gz", read_names(table))],
                       min_groups=3)
    assert 15 <= len(ct.class_names) <= 41 and {"liver", "spleen", "aorta"} <= set(ct.class_names)
    assert set(ct.groups) <= {f"s0/z{z:02d}" for z in range(9)}  # 30 slices of 3 mm in 10 mm slabs
    liver = ct.labels == ct.class_names.index("liver")
    assert 20 < to_hu(ct.images[liver, 14:18, 14:18]).mean() < 120  # unenhanced liver, ~45 HU in this scan
    # the DICOM series' label map stores rows flipped: read in world coordinates, liver is ~89 HU (flipped: ~ -75)
    dicom = organ_patches([load_subject(root / "example_ct_dicom", root / "example_seg_dicom.nii.gz",
                                        read_names(table))], min_groups=2, structures=["liver", "spleen"])
    for name in ("liver", "spleen"):
        sel = dicom.labels == dicom.class_names.index(name)
        assert 50 < to_hu(dicom.images[sel, 14:18, 14:18]).mean() < 130
