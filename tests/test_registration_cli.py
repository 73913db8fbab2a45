"""`python -m pipeline register`: outputs, and an ITK field that SimpleITK applies exactly as fewscan warps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from datasets.sources import load_nifti
from datasets.synth_decathlon import write_synthetic_subjects
from datasets.volume import FewscanError, InputError
from datasets.world import from_sitk, to_sitk
from pipeline.__main__ import main
from pipeline.common.config import validate
from pipeline.registration.deformation import read_displacement_field, warp_array
from pipeline.registration.register import load_checkpoint, predict_transform
from pipeline.registration.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    root = write_synthetic_subjects(base / "Task", n_cases=8, shape=(16, 16, 16))
    cfg = validate({"task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
                    "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]},
                    "train": {"iterations": 2, "lr": 0.003},
                    "registration": {"test_patients": 0.4, "adapt_patients": 0, "train_pairs": 4,
                                     "pairs_per_task": 2, "eval_pairs": 1, "features": 4, "levels": 2,
                                     "inner_steps": 2, "meta_lr": 1.0, "prealign": "none",
                                     "instance_steps": 10}})  # register refines each pair's field
    return train(cfg, base / "run")


def test_register_writes_an_itk_field_that_simpleitk_applies_like_fewscan(run: Path, tmp_path: Path) -> None:
    images = sorted((run.parent / "Task" / "imagesTr").glob("*.nii.gz"))
    labels = sorted((run.parent / "Task" / "labelsTr").glob("*.nii.gz"))
    fixed_path, moving_path = images[0], images[1]
    out = tmp_path / "out"
    rc = main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path),
               "--moving-labels", str(labels[1]), "--checkpoint", str(run), "--out", str(out)])
    assert rc == 0
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "register.json"):
        assert (out / name).is_file(), name

    fixed, moving = load_nifti(fixed_path), load_nifti(moving_path)
    # fewscan's own warp: the network's DDF on the (here identical) network grid, applied by MONAI's Warp
    cfg, model, state = load_checkpoint(run)
    ddf, grid, _, _ = predict_transform(cfg, model, fixed, moving, state["modality"])
    np.testing.assert_allclose(grid.affine, fixed.affine)
    assert np.abs(ddf).max() > 0.05  # a non-trivial field, or this test would prove nothing
    no_refine = replace(cfg, registration=replace(cfg.registration, instance_steps=0))
    network_only, _, _, _ = predict_transform(no_refine, model, fixed, moving, state["modality"])
    assert np.abs(ddf - network_only).max() > 0.01  # the written field is the instance-optimised one
    ours = warp_array(moving.array, ddf)
    # SimpleITK applying the written file to the original moving image
    field = read_displacement_field(out / "displacement.nii.gz")
    theirs = from_sitk(sitk.Resample(to_sitk(moving), to_sitk(fixed), field, sitk.sitkLinear, 0.0)).array
    written = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    # compare where every sample point x + ddf(x) falls inside the moving volume (outside: ITK pads with 0,
    # fewscan's image warp with the border value)
    shape = np.asarray(moving.array.shape)[:, None, None, None]
    target = np.indices(moving.array.shape) + ddf
    inside = ((target >= 0) & (target <= shape - 1)).all(0)
    assert inside.mean() > 0.5, (inside.mean(), np.abs(ddf).max(axis=(1, 2, 3)))
    scale = np.abs(moving.array).max()
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3 * scale)
    np.testing.assert_allclose(written[inside], ours[inside], atol=1e-3 * scale)
    warped_labels = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    assert set(np.unique(warped_labels)) <= {0, 1, 2}


def test_register_rejects_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(img))
    rc = main(["register", "--fixed", str(img), "--moving", str(img), "--checkpoint", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not a registration run" in capsys.readouterr().err


# --- bad input: one line naming the file and the reason, exit 2, no output folder ----------------------------------
def refused(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path, *needles: str) -> str:
    """`main(argv)` exits 2 with one line holding every needle, and `out` was never created."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fewscan {argv[0]}: error: "), err
    assert all(n in err for n in needles), err
    assert not out.exists()
    return err


def register_argv(run: Path, fixed: Path, moving: Path, out: Path, *extra: str) -> list[str]:
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--checkpoint", str(run), "--out", str(out),
            *extra]


def task_files(run: Path) -> tuple[list[Path], list[Path]]:
    task = run.parent / "Task"
    return sorted((task / "imagesTr").glob("*.nii.gz")), sorted((task / "labelsTr").glob("*.nii.gz"))


def test_register_refuses_a_single_slice_image(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = task_files(run)
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), str(flat))
    out = tmp_path / "out"
    for fixed, moving in ((flat, images[1]), (images[0], flat)):
        refused(capsys, register_argv(run, fixed, moving, out), out, f"{flat}: expected a 3D image with at least 2 "
                "voxels along every axis, got shape (16, 16, 1)")


def test_register_refuses_an_empty_moving_label_map(run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = task_files(run)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), nib.load(labels[1]).affine), str(empty))
    out = tmp_path / "out"
    refused(capsys, register_argv(run, images[0], images[1], out, "--moving-labels", str(empty)), out,
            f"{empty}: label map has no foreground labels")


def test_register_refuses_a_label_map_off_its_image(run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = task_files(run)
    far, moved = tmp_path / "far.nii.gz", tmp_path / "moved.nii.gz"
    label = nib.load(labels[1])
    for path, shift in ((far, 100.0), (moved, 6.0)):  # 100 mm: outside the 24 mm image; 6 mm: partly inside
        affine = label.affine.copy()
        affine[:3, 3] += shift
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), str(path))
    out = tmp_path / "out"
    refused(capsys, register_argv(run, images[0], images[1], out, "--moving-labels", str(far)), out,
            f"{far}: label map does not overlap its image {images[1]}")
    assert main(register_argv(run, images[0], images[1], out, "--moving-labels", str(moved))) == 0  # overlaps


@pytest.mark.parametrize("source", ["dicom", "flag"])
def test_register_refuses_two_modalities_with_a_mono_modal_run(run: Path, tmp_path: Path, source: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_factory import ramp, write_series

    if source == "dicom":  # each series' own Modality tag
        fixed, moving = tmp_path / "ct", tmp_path / "mr"
        write_series(fixed, ramp(16, 16, 8), modality="CT")
        write_series(moving, ramp(16, 16, 8, seed=1), modality="MR", prefix="2")
        extra, names = (), ("CT", "MR")
    else:  # NIfTI files say nothing; --modality once per image does
        fixed, moving = task_files(run)[0][:2]
        extra, names = ("--modality", "CT", "--modality", "MRI"), ("CT", "MRI")
    out = tmp_path / "out"
    refused(capsys, register_argv(run, fixed, moving, out, *extra), out,
            f"{fixed} is {names[0]} but {moving} is {names[1]}", "mono-modal similarity (lncc)",
            "registration.similarity: mi")


def test_register_accepts_an_unknown_or_matching_modality(run: Path, tmp_path: Path) -> None:
    from dicom_factory import ramp, write_series

    images, _ = task_files(run)
    ct = tmp_path / "ct"
    write_series(ct, ramp(16, 16, 8), modality="CT")
    # a NIfTI file (no modality) against a CT series: nothing to compare, so nothing is guessed
    assert main(register_argv(run, ct, images[1], tmp_path / "a")) == 0
    assert main(register_argv(run, images[0], images[1], tmp_path / "b", "--modality", "MR", "--modality",
                              "T2")) == 0  # DICOM's family name MR covers the contrast T2


def test_modality_names_compare_by_what_they_say() -> None:
    from pipeline.registration.register import check_modalities, modalities_differ

    assert not modalities_differ("MRI", "mr") and not modalities_differ("MR", "FLAIR")
    assert modalities_differ("CT", "MR") and modalities_differ("T2", "ADC") and modalities_differ("CT", "T1")
    check_modalities("mi", (Path("f"), Path("m")), ("CT", "MR"))  # mutual information: multi-modal, accepted
    check_modalities("lncc", (Path("f"), Path("m")), ("CT", None))  # unknown side: accepted
    with pytest.raises(FewscanError, match="f is CT but m is MR"):
        check_modalities("lncc", (Path("f"), Path("m")), ("CT", "MR"))


def test_register_names_the_fixed_image_when_the_network_grid_differs(run: Path) -> None:
    from pipeline.common.config import RegistrationConfig
    from pipeline.registration.network import RegistrationNet

    cfg, _, state = load_checkpoint(run)
    fixed_path, moving_path = task_files(run)[0][:2]
    other = RegistrationNet(RegistrationConfig(features=4, levels=2, prealign="none"), (8, 8, 8))
    with pytest.raises(InputError, match=r"synth_000.nii.gz: prepared, it is \[16, 16, 16\] voxels but the network "
                                         r"was trained on \[8, 8, 8\]"):
        predict_transform(cfg, other, load_nifti(fixed_path), load_nifti(moving_path), state["modality"],
                          fixed_path=fixed_path)


def test_register_aligns_scans_that_share_no_world_origin_and_matches_evaluate(run: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]
                                                                                ) -> None:
    """A moving scan stored 500 mm away (another session's origin) registers as if it were not moved, and the
    field is what `evaluate` computes for the pair (prepared volumes taken voxel for voxel on one grid); before,
    `register` wrote all-zero images with exit 0."""
    from pipeline.registration.episodes import preprocess
    from pipeline.registration.network import Losses, predict, refine

    cfg, model, state = load_checkpoint(run)
    fixed_path, moving_path = task_files(run)[0][:2]
    moved = nib.load(moving_path)
    affine = moved.affine.copy()
    affine[:3, 3] += [500.0, -300.0, 200.0]
    far = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), far)
    fixed = load_nifti(fixed_path)
    ddf_far, _, on_grid, _ = predict_transform(cfg, model, fixed, load_nifti(far), state["modality"])
    ddf, _, _, _ = predict_transform(cfg, model, fixed, load_nifti(moving_path), state["modality"])
    assert np.abs(on_grid.array).max() > 0.5  # the moving image is on the grid, not zeros
    np.testing.assert_allclose(ddf_far, ddf, atol=1e-4)
    # evaluate's computation of the same pair: each prepared volume voxel for voxel on the common grid
    (f, _), (m, _) = (preprocess(cfg, load_nifti(p), None, 0, state["modality"]) for p in (fixed_path, far))
    ft, mt = (torch.from_numpy(np.asarray(v.array, np.float32))[None, None] for v in (f, m))
    rcfg = cfg.registration
    expected = refine(predict(model, mt, ft), mt, ft, Losses(rcfg, 1), rcfg.instance_steps, rcfg.instance_lr)
    np.testing.assert_allclose(ddf_far, expected[0].numpy(), atol=1e-4)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(far), "--checkpoint", str(run),
                 "--out", str(out)]) == 0
    assert np.asarray(nib.load(out / "warped.nii.gz").dataobj).max() > 0.5


def test_register_refuses_fields_of_view_that_cannot_overlap(run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    fixed_path, moving_path = task_files(run)[0][:2]
    moved = nib.load(moving_path)
    sliver = np.asarray(moved.dataobj)[:, :, 7:9]  # 2 of 16 slices: centred, it covers 1/8 of the fixed grid
    affine = moved.affine.copy()
    affine[:3, 2] *= 0.5  # and at half the slice thickness: 1/16
    nib.save(nib.Nifti1Image(sliver, affine), tmp_path / "sliver.nii.gz")
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(tmp_path / "sliver.nii.gz"),
                 "--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot overlap" in err and "Traceback" not in err and not out.exists()
