"""Exact resume for every task kind: a run stopped part way and resumed with `train --resume` ends with the same
weights as an uninterrupted one; `--resume` without a checkpoint is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.__main__ import main
from pipeline.common.config import load_config

REPO = Path(__file__).resolve().parents[1]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]


def interrupted_then_resumed(train, config: Path, sets: list[str], tmp_path: Path, stop_at: int) -> tuple[Path, Path]:
    """An uninterrupted run, and one stopped after `stop_at` iterations and resumed through the CLI."""
    cfg = lambda: load_config(config, sets)  # noqa: E731 - a fresh config per run (training sets in_channels)
    full = train(cfg(), tmp_path / "full")
    part = tmp_path / "part"
    train(cfg(), part, stop_at=stop_at)
    assert not (part / "model.safetensors").exists()  # interrupted: no final model yet
    assert json.loads((part / "last" / "state.json").read_text())["iteration"] == stop_at
    assert main(["train", str(config), "--out", str(part), "--resume", *[a for s in sets for a in ("--set", s)]]) == 0
    assert_same_weights(full / "model.safetensors", part / "model.safetensors")
    assert (full / "curves.json").read_text() == (part / "curves.json").read_text()
    return full, part


def test_classification_resumes_exactly(tmp_path: Path) -> None:
    from test_train import tiny_npz

    from pipeline.classification.train import train

    sets = [f"data.root={tiny_npz(tmp_path / 'tiny.npz')}", "split.novel=[c5, c6]", "split.validation=[c3, c4]",
            "model.encoder=conv4_2d", "model.filters=4", "model.norm_groups=2", "ways=2", "shots=1", "queries=2",
            "train.iterations=4", "train.log_every=1", "train.val_every=1", "train.val_episodes=2",
            "train.device=cpu", "train.tensorboard=false", "method.name=maml", "method.inner_steps=1",
            "method.meta_batch=2"]
    full, part = interrupted_then_resumed(train, REPO / "configs" / "classify_npz.yaml", sets, tmp_path, 2)
    assert_same_weights(full / "best" / "model.safetensors", part / "best" / "model.safetensors")


@pytest.mark.parametrize("stop_at", [2, 3])  # inside pre-training, and at its last iteration
def test_pretraining_then_episodes_resumes_exactly(tmp_path: Path, stop_at: int) -> None:
    """Meta-Baseline's schedule: 3 supervised iterations (the base-class head is checkpointed as task state), then
    episodic ProtoNet; a stop anywhere resumes to the same weights and curves."""
    from test_train import tiny_npz

    from pipeline.classification.train import train

    sets = [f"data.root={tiny_npz(tmp_path / 'tiny.npz')}", "split.novel=[c5, c6]", "split.validation=[c3, c4]",
            "model.encoder=conv4_2d", "model.filters=4", "model.norm_groups=2", "ways=2", "shots=1", "queries=2",
            "train.iterations=5", "train.pretrain_iterations=3", "train.pretrain_batch=6", "train.log_every=1",
            "train.val_every=1", "train.val_episodes=2", "train.device=cpu", "train.tensorboard=false",
            "method.name=protonet", "transforms.augment.enabled=true"]
    full, part = interrupted_then_resumed(train, REPO / "configs" / "classify_npz.yaml", sets, tmp_path, stop_at)
    extra = load_file(str(part / "last" / "extra.safetensors"))
    assert any("pretrain_head" in k for k in extra)  # the head was checkpointed, and is not in the model
    assert not any("pretrain" in k for k in load_file(str(full / "model.safetensors")))


def test_segmentation_resumes_exactly(tmp_path: Path) -> None:
    from datasets.synth_decathlon import write_synthetic_organs
    from pipeline.segmentation.train import train

    root = write_synthetic_organs(tmp_path / "Task99", n_cases=4, shape=(20, 24, 16), unlabelled=1)
    sets = [f"data.root={root}", "train.iterations=4", "train.log_every=1", "train.threads=1",
            "segmentation.mode=2d", "segmentation.method=proto", "segmentation.channels=[8, 16]",
            "segmentation.features=8", "segmentation.test_patients=0.5", "segmentation.n_supervoxels=20"]
    interrupted_then_resumed(train, REPO / "configs" / "segment_decathlon_ssl.yaml", sets, tmp_path, 2)


def test_registration_reptile_resumes_exactly(tmp_path: Path) -> None:
    """Reptile carries its inner Adam state from task to task: a resume must restore it too."""
    from datasets.synth_decathlon import write_synthetic_subjects
    from pipeline.registration.train import train

    root = write_synthetic_subjects(tmp_path / "Task", n_cases=8, shape=(18, 16, 15))
    config = tmp_path / "register.yaml"
    config.write_text(yaml.safe_dump({
        "task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
        "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]},
        "train": {"iterations": 4, "lr": 1e-3, "log_every": 1},
        "registration": {"test_patients": 0.5, "adapt_patients": 2, "train_pairs": 6, "pairs_per_task": 2,
                         "eval_pairs": 2, "adapt_pairs": 2, "features": 4, "levels": 2, "inner_steps": 2}}))
    full, part = interrupted_then_resumed(train, config, [], tmp_path, 2)
    extra = load_file(str(part / "last" / "extra.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in extra)  # the inner Adam's moments were checkpointed
    assert json.loads((part / "state.json").read_text())["volume_size"] == [16, 16, 16]


@pytest.mark.parametrize("config", ["classify_npz.yaml", "segment_decathlon_ssl.yaml", "register_decathlon.yaml"])
def test_resume_without_a_checkpoint_is_one_line_and_exit_2(config: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", str(REPO / "configs" / config), "--out", str(out), "--resume", "--set", "data.root=unused"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def _classification_sets(tmp_path: Path) -> list[str]:
    from test_train import tiny_npz

    return [f"data.root={tiny_npz(tmp_path / 'tiny.npz')}", "split.novel=[c5, c6]", "split.validation=[]",
            "model.encoder=conv4_2d", "model.filters=4", "model.norm_groups=2", "ways=2", "shots=1", "queries=2",
            "train.iterations=4", "train.log_every=1", "train.checkpoint_every=1", "train.device=cpu",
            "train.tensorboard=false"]


def test_resume_refuses_a_changed_config_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from conftest import folder_bytes

    from pipeline.classification.train import train

    config, sets = REPO / "configs" / "classify_protonet.yaml", _classification_sets(tmp_path)
    part = tmp_path / "part"
    train(load_config(config, sets), part, stop_at=2)
    before = folder_bytes(part)
    args = ["train", str(config), "--out", str(part), "--resume", *[a for s in sets for a in ("--set", s)]]
    assert main([*args, "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "0.001" in err and "0.5" in err and "Traceback" not in err
    assert folder_bytes(part) == before  # config.yaml and the checkpoint untouched
    # runtime keys may change: a longer schedule resumes
    assert main([*args, "--set", "train.iterations=5", "--set", "train.threads=1"]) == 0
    assert json.loads((part / "state.json").read_text())["iterations"] == 5


def test_a_kill_during_a_checkpoint_leaves_a_whole_set(tmp_path: Path) -> None:
    """Killed while writing `last/` (a half-written staging folder) or between its two renames (only the old set,
    moved aside): resume starts from a consistent set and ends bit-identical to an uninterrupted run."""
    import shutil

    from pipeline.classification.train import train

    config, sets = REPO / "configs" / "classify_protonet.yaml", _classification_sets(tmp_path)
    full = train(load_config(config, sets), tmp_path / "full")
    args = lambda out: ["train", str(config), "--out", str(out), "--resume",  # noqa: E731
                        *[a for s in sets for a in ("--set", s)]]
    # killed while writing iteration 3's set: iteration 2's `last/` is whole, a partial staging folder lies beside
    a = tmp_path / "a"
    train(load_config(config, sets), a, stop_at=2)
    (a / ".last.new").mkdir()
    shutil.copy(a / "last" / "model.safetensors", a / ".last.new" / "model.safetensors")
    assert main(args(a)) == 0
    assert_same_weights(full / "model.safetensors", a / "model.safetensors")
    assert not (a / ".last.new").exists()
    # killed between the renames: no `last/`, the previous set moved aside
    b = tmp_path / "b"
    train(load_config(config, sets), b, stop_at=2)
    (b / "last").rename(b / ".last.old")
    assert main(args(b)) == 0
    assert_same_weights(full / "model.safetensors", b / "model.safetensors")
    assert not (b / ".last.old").exists()
