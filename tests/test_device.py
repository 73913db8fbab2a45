"""Every task kind on `train.device`: the CUDA path (skipped without a GPU) must train, evaluate and register like
the CPU path, and record where it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datasets.synth_decathlon import write_synthetic_organs, write_synthetic_subjects
from pipeline.common.config import load_config, validate
from pipeline.registration.network import model_device, predict, refine

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def reg_config(root: Path, device: str) -> dict:
    return {"task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
            "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]},
            "train": {"iterations": 3, "lr": 1e-3, "device": device},
            "registration": {"test_patients": 0.5, "adapt_patients": 2, "train_pairs": 8, "pairs_per_task": 2,
                             "eval_pairs": 3, "adapt_pairs": 2, "features": 4, "levels": 2, "inner_steps": 2,
                             "adapt_steps": 2, "instance_steps": 5, "baseline": "none", "prealign": "none"}}


def test_predict_and_refine_return_fields_on_the_inputs_device() -> None:
    from pipeline.common.config import RegistrationConfig
    from pipeline.registration.network import Losses, RegistrationNet

    rcfg = RegistrationConfig(features=4, levels=2, prealign="none")
    net = RegistrationNet(rcfg, (16, 16, 16))
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    ddf = predict(net, moving, fixed)
    refined = refine(ddf, moving, fixed, Losses(rcfg, 1), 3, 0.1, model_device(net))
    assert ddf.device == refined.device == moving.device and refined.shape == (1, 3, 16, 16, 16)
    assert not torch.equal(refined, ddf)  # the steps moved the field


@CUDA
@pytest.mark.slow
def test_registration_trains_and_evaluates_on_cuda_like_on_cpu(tmp_path: Path) -> None:
    from pipeline.registration.evaluate import evaluate
    from pipeline.registration.train import train

    root = write_synthetic_subjects(tmp_path / "Task", n_cases=10, shape=(18, 16, 15))
    reports = {}
    for device in ("cpu", "cuda"):
        run = train(validate(reg_config(root, device)), tmp_path / device)
        assert json.loads((run / "state.json").read_text())["device"].startswith(device)
        reports[device] = evaluate(run)
    cpu, gpu = (reports[d]["metrics"]["dice"]["mean"] for d in ("cpu", "cuda"))
    assert abs(cpu - gpu) < 0.05  # same seeds; kernels differ in the last bits only


@CUDA
@pytest.mark.slow
def test_label_propagation_trains_and_segments_on_cuda(tmp_path: Path) -> None:
    from pipeline.segmentation.evaluate import evaluate
    from pipeline.segmentation.train import train

    root = write_synthetic_organs(tmp_path / "Organs", n_cases=6, shape=(20, 24, 16))
    cfg = load_config(REPO / "configs" / "segment_propagate.yaml",
                      [f"data.root={root}", "train.iterations=2", "train.device=cuda", "episodes.eval_episodes=2",
                       "registration.instance_steps=3", "registration.features=4", "transforms.spacing=[2, 2, 2]",
                       "segmentation.baselines=[]"])
    run = train(cfg, tmp_path / "run")
    assert json.loads((run / "state.json").read_text())["device"].startswith("cuda")
    assert 0.0 <= evaluate(run)["metrics"]["dice"]["mean"] <= 1.0
