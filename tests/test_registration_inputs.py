"""Bad registration input to `train` and `evaluate`: one line naming the key or file and the reason, exit code 2,
no run directory left behind (or the run left as it was)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import folder_bytes

from datasets.synth_decathlon import write_synthetic_subjects
from datasets.volume import FewscanError
from pipeline.__main__ import main
from pipeline.common.config import validate
from pipeline.registration.train import plan_pairs


def config_file(tmp_path: Path, root: Path, volume_size: list[int] | tuple[int, ...] | None = (16, 16, 16),
                **reg) -> Path:
    """A tiny registration config (levels 2 with half_res: volume sides must be multiples of 4) written to YAML."""
    raw = {"task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
           "transforms": {"preset": "mr", "spacing": None,
                          "volume_size": list(volume_size) if volume_size is not None else None},
           "train": {"iterations": 1, "lr": 0.003},
           "registration": {"test_patients": 0.4, "adapt_patients": 0, "train_pairs": 4, "pairs_per_task": 2,
                            "eval_pairs": 1, "features": 4, "levels": 2, "inner_steps": 1, "meta_lr": 1.0,
                            "prealign": "none", "baseline": "none", "baseline_affine": False, **reg}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def refused_train(capsys: pytest.CaptureFixture[str], config: Path, run: Path, *needles: str) -> str:
    """`train` exits 2 with one line holding every needle, and leaves no run directory."""
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fewscan train: error: "), err
    assert all(n in err for n in needles), err
    assert not run.exists()
    return err


def replace_label(path: Path, array: np.ndarray | None = None, shift_mm: float = 0.0) -> None:
    """Rewrite a label file: another array (same grid) and/or its grid moved by `shift_mm` along every axis."""
    label = nib.load(path)
    affine = label.affine.copy()
    affine[:3, 3] += shift_mm
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj) if array is None else array, affine), str(path))


def test_train_refuses_a_volume_size_the_network_cannot_take(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "Task"  # never read: the config is refused first
    for size, fit in (([18, 18, 18], "[16, 16, 16]"), ([2, 16, 16], "[4, 16, 16]")):
        config = config_file(tmp_path, root, size)
        refused_train(capsys, config, tmp_path / "run", f"{config}: transforms.volume_size {size} is not a positive "
                      "multiple of 4 on every side", "registration.levels=2, half_res=true", f"e.g. {fit}")
    validate(yaml.safe_load(config_file(tmp_path, root, [18, 18, 18], half_res=False).read_text()))  # 2 divides 18
    seg = yaml.safe_load(config_file(tmp_path, root, [18, 18, 18]).read_text()) | {"task": "segmentation"}
    validate(seg)  # only a registration run has the registration network's grid


def test_train_refuses_unset_volume_size_with_volumes_of_several_shapes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = write_synthetic_subjects(tmp_path / "Task", n_cases=6, shape=(16, 16, 16))
    config = config_file(tmp_path, root, None)
    case = plan_pairs(validate(yaml.safe_load(config.read_text())))[1]["train"][0]["cases"][0]
    for path in (case["image"], case["label"]):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :12], img.affine), path)
    refused_train(capsys, config, tmp_path / "run", f"prepared volumes differ in shape: {case['image']} is "
                  "[16, 16, 12] voxels", "set transforms.volume_size (multiples of 4)")


def test_train_refuses_unset_volume_size_the_network_cannot_take(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = write_synthetic_subjects(tmp_path / "Task", n_cases=6, shape=(18, 18, 18))
    refused_train(capsys, config_file(tmp_path, root, None), tmp_path / "run",
                  f"{root}: the prepared volume size [18, 18, 18] is not a positive multiple of 4",
                  "set transforms.volume_size to multiples of 4, e.g. [16, 16, 16]")


def test_train_refuses_a_label_map_off_its_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_synthetic_subjects(tmp_path / "Task", n_cases=6, shape=(16, 16, 16))
    config = config_file(tmp_path, root)
    _, pairs = plan_pairs(validate(yaml.safe_load(config.read_text())))
    case = pairs["train"][0]["cases"][0]
    replace_label(Path(case["label"]), shift_mm=100.0)  # the 24 mm image lies far from its labels
    refused_train(capsys, config, tmp_path / "run", f"{case['label']}: label map does not overlap its image "
                  f"{case['image']}")


def test_empty_label_map_trains_without_labels_and_evaluate_refuses_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An all-background label map: a training case is used without labels (warning naming the file), a held-out
    one cannot be scored by Dice, so `evaluate` refuses, naming the file, and changes nothing in the run."""
    from pipeline.registration.episodes import PairData

    root = write_synthetic_subjects(tmp_path / "Task", n_cases=6, shape=(16, 16, 16))
    config = config_file(tmp_path, root)
    cfg = validate(yaml.safe_load(config.read_text()))
    _, pairs = plan_pairs(cfg)
    held_out = {c["label"] for p in pairs["eval"] for c in p["cases"]}
    trained = next(c["label"] for p in pairs["train"] for c in p["cases"] if c["label"] not in held_out)
    replace_label(Path(trained), np.zeros((16, 16, 16), np.uint8))
    data = PairData(cfg, pairs["train"])
    assert [data.cases[k][1] is None for k in data.cases].count(True) == 1  # only that case lost its labels
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(config), "--out", str(run)]) == 0
    assert f"{trained}: label map has no foreground labels; its case is used without labels" in caplog.text
    evaluated = sorted(held_out)[0]
    replace_label(Path(evaluated), np.zeros((16, 16, 16), np.uint8))
    before = folder_bytes(run)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fewscan evaluate: error: {evaluated}: label map has no foreground labels; held-out pairs need "
                   "labels on both sides for Dice")
    assert folder_bytes(run) == before


def test_evaluate_refuses_held_out_volumes_of_another_shape(tmp_path: Path) -> None:
    from pipeline.registration.evaluate import check_trained_shape

    (tmp_path / "state.json").write_text(json.dumps({"volume_size": [16, 16, 16]}))
    cfg = validate({"task": "registration", "data": {"root": "Task"}})
    check_trained_shape(tmp_path, cfg, (16, 16, 16))
    with pytest.raises(FewscanError, match=r"held-out volumes are \[16, 16, 12\] voxels but the network was trained "
                                           r"on \[16, 16, 16\]: train with transforms.volume_size set"):
        check_trained_shape(tmp_path, cfg, (16, 16, 12))
