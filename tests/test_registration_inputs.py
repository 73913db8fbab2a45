"""Bad registration input to `train` and `evaluate`: one line naming the key or file and the reason, exit code 2,
no run directory left behind (or the run left as it was)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datasets.synth_decathlon import write_synthetic_subjects
from pipeline.__main__ import main
from pipeline.common.config import validate


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


def test_train_refuses_unset_volume_size_the_network_cannot_take(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = write_synthetic_subjects(tmp_path / "Task", n_cases=6, shape=(18, 18, 18))
    refused_train(capsys, config_file(tmp_path, root, None), tmp_path / "run",
                  f"{root}: the prepared volume size [18, 18, 18] is not a positive multiple of 4",
                  "set transforms.volume_size to multiples of 4, e.g. [16, 16, 16]")
