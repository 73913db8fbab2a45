"""`export --format bundle`: the MONAI Bundle, run by `python -m monai.bundle run` without fewscan, gives what
`predict` gives (classification probabilities, segmentation masks), and refusals leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from datasets.synth_decathlon import synthetic_case
from pipeline.__main__ import main
from pipeline.common.config import to_dict, validate
from pipeline.common.run import save_weights
from pipeline.segmentation.train import build_model

REPO = Path(__file__).resolve().parents[1]
LPS = np.array([[-1.5, 0, 0, 30], [0, -1.2, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]])  # LPS-stored, anisotropic


def run_bundle(bundle: Path, scans: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`python -m monai.bundle run` on the bundle, from outside the repository and without PYTHONPATH, where
    fewscan's packages cannot be imported (checked first)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = bundle.parent
    assert subprocess.run([sys.executable, "-c", "import pipeline"], cwd=cwd, env=env,
                          capture_output=True).returncode != 0, "fewscan is importable outside the repository"
    c = bundle / "configs"
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(c / "inference.json"),
                           "--meta_file", str(c / "metadata.json"), "--bundle_root", str(bundle),
                           "--input_dir", str(scans), "--output_dir", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _scan(path: Path, cls: int, rng: np.random.Generator) -> None:
    """A CT-like scan of class `cls`: a bright cube at a class-specific position in noise."""
    a = rng.normal(0, 50, (14, 13, 10)).astype(np.float32) - 800
    a[2 + 3 * cls:6 + 3 * cls, 3:8, 2:7] = 300
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(a, LPS), str(path))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny protonet (cosine) trained one iteration on NIfTI class folders, adapted to 3 classes; its folder
    holds `adapted/`, `scans/` (2 scans outside the support) and `pred/` (what `predict` wrote for them)."""
    base = tmp_path_factory.mktemp("classify")
    rng = np.random.default_rng(0)
    for c in range(3):
        for k in range(2):
            _scan(base / "train" / f"c{c}" / f"case{k}.nii.gz", c, rng)
    for name, c in (("new_a.nii.gz", 1), ("new_b.nii.gz", 0)):
        _scan(base / "scans" / name, c, rng)
    sets = ["data.source=folder", f"data.root={base / 'train'}", "data.labels=null", "split.novel=[c2]",
            "transforms.roi_size=[12, 12, 12]", "transforms.spacing=[1.7, 1.7, 1.7]", "model.channels=[4, 8]",
            "model.pool_size=2", "method.distance=cosine", "ways=2", "shots=1", "queries=1",
            "episodes.eval_episodes=2", "train.iterations=1", "train.device=cpu"]
    assert main(["train", str(REPO / "configs" / "base.yaml"), "--out", str(base / "run"),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    (base / "support.csv").write_text("path,label\n" + "".join(f"train/c{c}/case0.nii.gz,k{c}\n" for c in range(3)))
    assert main(["adapt", str(base / "run"), "--support", str(base / "support.csv"), "--out",
                 str(base / "adapted")]) == 0
    scans = sorted(str(p) for p in (base / "scans").iterdir())
    assert main(["predict", str(base / "adapted"), *scans, "--out", str(base / "pred")]) == 0
    return base


def test_classification_bundle_gives_predict_probabilities(classifier: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", str(classifier / "adapted"), "--format", "bundle", "--out", str(bundle)]) == 0
    assert {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} == {
        "configs/inference.json", "configs/metadata.json", "models/model.ts", "docs/README.md"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    classes = ["k0", "k1", "k2"]
    assert meta["pred_classes"] == classes and meta["monai_version"] and meta["pytorch_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "k0", "1": "k1", "2": "k2"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [12, 12, 12]

    done = run_bundle(bundle, classifier / "scans", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {Path(r["input"]).name: r for r in json.loads((classifier / "pred" / "predictions.json").read_text())}
    got = {Path(r["input"]).name: r for r in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert set(got) == set(expected) == {"new_a.nii.gz", "new_b.nii.gz"}
    for name, rec in got.items():
        want = expected[name]["probabilities"]
        assert list(rec["probabilities"]) == classes and rec["prediction"] == expected[name]["prediction"]
        assert max(abs(rec["probabilities"][c] - want[c]) for c in classes) < 1e-4, (rec, want)
        assert 0.05 < max(want.values()) < 0.95, want  # not saturated: the comparison has teeth
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "input,prediction,p_k0,p_k1,p_k2" and len(rows) == 3


@pytest.mark.parametrize("seg, transforms", [
    ({"mode": "2d", "method": "proto"}, {"spacing": [1.0, 1.0, 2.0]}),  # resampled, and back (ties included)
    ({"mode": "3d", "method": "proto", "crop": [16, 16, 8]}, {}),  # sliding windows of features, decoded once
    ({"mode": "3d", "method": "maml", "crop": [16, 16, 8], "inner_steps": 2}, {"preset": "ct", "window": [0, 900]}),
], ids=["2d-proto-resampled", "3d-proto-windows", "3d-maml-ct"])
def test_segmentation_bundle_gives_predict_masks(tmp_path: Path, seg: dict, transforms: dict) -> None:
    """An untrained tiny run (as tests/test_seg_io.py) adapted to structure 1 of one scan; the bundle's mask of
    another scan is `predict`'s, voxel for voxel, on the scan's own grid."""
    cfg = validate({"task": "segmentation", "segmentation": {"channels": [8, 16], "features": 8, **seg},
                    "transforms": {"preset": "mr", "spacing": None, "percentiles": [0.5, 99.5], **transforms}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    save_weights(build_model(cfg), run / "model.safetensors")
    for name, seed in (("support", 1), ("scans/new", 2)):
        image, label = synthetic_case(np.random.default_rng(seed), (26, 22, 12))
        (tmp_path / name).parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image, LPS), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, LPS), str(tmp_path / f"{name}_label.nii.gz"))
    (tmp_path / "scans" / "new_label.nii.gz").unlink()
    (tmp_path / "support.csv").write_text("image,label\nsupport.nii.gz,support_label.nii.gz\n")
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"), "--out", str(tmp_path / "adapted"),
                 "--structure", "1"]) == 0
    assert main(["predict", str(tmp_path / "adapted"), str(tmp_path / "scans" / "new.nii.gz"), "--out",
                 str(tmp_path / "pred")]) == 0
    (tmp_path / "bundle").mkdir()  # an empty --out is taken
    assert main(["export", str(tmp_path / "adapted"), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["pred_classes"] == ["background", "1"] and meta["fewscan"]["method"] == seg["method"]

    done = run_bundle(tmp_path / "bundle", tmp_path / "scans", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = nib.load(str(tmp_path / "pred" / "pred_00.nii.gz")), nib.load(str(tmp_path / "out" / "new_seg.nii.gz"))
    assert got.shape == want.shape == (26, 22, 12) and np.allclose(got.affine, LPS) and np.allclose(want.affine, LPS)
    a, b = np.asarray(want.dataobj), np.asarray(got.dataobj)
    assert 0 < a.sum() < a.size / 2, "a trivial mask would prove nothing"
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    capsys.readouterr()
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewscan export: error:") and needle in err[0], err


def test_refusals_are_one_line_and_leave_nothing(classifier: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # a propagation run: its model is registration to stored support scans, not one scoring network
    cfg = validate({"task": "segmentation", "segmentation": {"method": "propagate"}})
    prop = tmp_path / "propagate"
    prop.mkdir()
    (prop / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (prop / "adapted.json").write_text(json.dumps({"task": "segmentation", "method": "propagate", "shots": 1}))
    _refused(capsys, [str(prop), "--out", str(tmp_path / "b1")], "propagate")
    # a trained run, not an adapted folder
    _refused(capsys, [str(classifier / "run"), "--out", str(tmp_path / "b2")], "not an adapted folder")
    # an --out that holds something: untouched
    (tmp_path / "b3").mkdir()
    (tmp_path / "b3" / "keep.txt").write_text("mine")
    _refused(capsys, [str(classifier / "adapted"), "--out", str(tmp_path / "b3")], "not an empty folder")
    assert [p.name for p in (tmp_path / "b3").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b3", "propagate"]  # no bundle, no hidden temporary


def test_a_failure_while_writing_leaves_no_bundle(classifier: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.export as export

    def fail(meta: dict) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(export, "_readme", fail)  # the last file written
    with pytest.raises(OSError, match="disk full"):
        export.export_bundle(classifier / "adapted", tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
