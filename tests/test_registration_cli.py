"""`python -m pipeline register`: outputs, and an ITK field that SimpleITK applies exactly as fewscan warps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from datasets.sources import load_nifti
from datasets.synth_decathlon import write_synthetic_subjects
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
                                     "inner_steps": 2, "meta_lr": 1.0, "prealign": "none"}})
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
