"""torchrun with 2 gloo processes gives the same weights as one process on the same meta-batches."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.classification.train import train
from pipeline.common.config import load_config
from pipeline.common.distributed import World

REPO = Path(__file__).resolve().parents[1]


def test_world_splits_tasks_round_robin() -> None:
    assert World(0, 2).mine(5) == [0, 2, 4] and World(1, 2).mine(5) == [1, 3] and World().mine(3) == [0, 1, 2]


def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (30, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.repeat(np.arange(5), 6),
             class_names=np.asarray([f"c{c}" for c in range(5)]))
    sets = [f"data.root={tmp_path / 'd.npz'}", "split.novel=[c4]", "split.validation=[]", "model.filters=4",
            "model.norm_groups=2", "ways=2", "shots=1", "queries=2", "train.iterations=1", "train.device=cpu",
            "train.tensorboard=false", "method.inner_steps=1", "method.meta_batch=4", "method.name=maml"]
    config = REPO / "configs" / "classify_npz.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline", "train", str(config), "--out", str(tmp_path / "multi"),
           *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    train(load_config(config, sets), tmp_path / "single")
    multi = load_file(str(tmp_path / "multi" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    untrained = load_file(str(tmp_path / "single" / "untrained.safetensors"))
    assert multi.keys() == single.keys()
    assert all(torch.allclose(multi[k], single[k], atol=1e-6, rtol=1e-5) for k in single)
    assert any(not torch.equal(single[k], untrained[k]) for k in single)  # it did train
