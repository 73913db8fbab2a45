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


@CUDA
@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["segmentation.mode=2d", "segmentation.method=proto", "segmentation.baselines=[finetune]"],
    ["segmentation.mode=3d", "segmentation.method=maml", "segmentation.baselines=[]", "shots=1"],
])
def test_prototype_and_maml_segmentation_train_evaluate_adapt_predict_on_cuda(tmp_path: Path,
                                                                             overrides: list[str]) -> None:
    import nibabel as nib

    from pipeline.segmentation.adapt import adapt, predict
    from pipeline.segmentation.evaluate import evaluate
    from pipeline.segmentation.train import train

    root = write_synthetic_organs(tmp_path / "Organs", n_cases=6, shape=(20, 24, 16), unlabelled=1)
    sets = [f"data.root={root}", "train.iterations=3", "episodes.eval_episodes=1", "segmentation.finetune_steps=2",
            "segmentation.channels=[8, 16]", "segmentation.features=8", "segmentation.crop=[16, 16, 16]",
            "segmentation.test_patients=0.5", "segmentation.n_supervoxels=20", *overrides]
    dice = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(REPO / "configs" / "segment_decathlon_ssl.yaml", [*sets, f"train.device={device}"])
        run = train(cfg, tmp_path / device)
        assert json.loads((run / "state.json").read_text())["device"].startswith(device)
        dice[device] = evaluate(run)["metrics"]["dice"]["mean"]
    assert abs(dice["cpu"] - dice["cuda"]) < 0.05  # same seeds; kernels differ in the last bits only
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    images = [root / "imagesTr" / p.name for p in labels]
    (tmp_path / "support.csv").write_text(f"image,label\n{images[0]},{labels[0]}\n")
    adapt(tmp_path / "cuda", tmp_path / "support.csv", tmp_path / "adapted")
    rows = predict(tmp_path / "adapted", [images[1]], tmp_path / "pred")
    assert nib.load(rows[0]["nifti"]).shape == nib.load(str(images[1])).shape


@CUDA
@pytest.mark.slow
def test_classification_adapt_and_predict_on_cuda_match_the_cpu(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from pipeline.__main__ import main

    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (30, 16, 16)).astype(np.uint8)
    for c in range(5):
        images[c * 6:(c + 1) * 6, c * 3:c * 3 + 4, c * 3:c * 3 + 4] = 250
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.repeat(np.arange(5), 6),
             class_names=np.asarray([f"c{c}" for c in range(5)]))
    support = tmp_path / "support"
    for name, idx in (("new_a", 18), ("new_b", 0)):
        (support / name).mkdir(parents=True)
        Image.fromarray(images[idx]).save(support / name / "1.png")
    Image.fromarray(images[19]).save(tmp_path / "q.png")
    probs = {}
    for device in ("cpu", "cuda"):
        sets = [f"data.root={tmp_path / 'tiny.npz'}", "split.novel=[c3, c4]", "split.validation=[]",
                "model.filters=4", "ways=2", "shots=1", "queries=2", "episodes.eval_episodes=2",
                "train.iterations=2", f"train.device={device}"]
        run, adapted, pred = tmp_path / f"run_{device}", tmp_path / f"adapted_{device}", tmp_path / f"pred_{device}"
        assert main(["train", str(REPO / "configs" / "classify_protonet.yaml"), "--out", str(run),
                     *[a for s in sets for a in ("--set", s)]]) == 0
        assert main(["adapt", str(run), "--support", str(support), "--out", str(adapted)]) == 0
        assert main(["predict", str(adapted), str(tmp_path / "q.png"), "--out", str(pred)]) == 0
        probs[device] = json.loads((pred / "predictions.json").read_text())[0]["probabilities"]
    assert probs["cpu"].keys() == probs["cuda"].keys()
    assert all(abs(probs["cpu"][c] - probs["cuda"][c]) < 1e-3 for c in probs["cpu"])
