"""Segmentation meta-training: supervoxel pseudo-structures (self-supervised) or the training structures.

Run directory: `config.yaml`, `split.json` (train/test structures and case counts), `untrained.safetensors`,
`model.safetensors`, `state.json` (time, peak memory), `curves.json`.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from datasets.volume import FewscanError, atomic_path
from pipeline.common.config import Config, to_dict
from pipeline.common.episodes import episode_loader
from pipeline.common.progress import progress
from pipeline.common.report import write_json
from pipeline.common.run import save_weights, seed_everything, set_threads
from pipeline.segmentation.data import load_cases, split_patients, split_structures
from pipeline.segmentation.episodes import SegEpisodes, precompute_supervoxels

log = logging.getLogger(__name__)


def build_model(cfg: Config) -> nn.Module:
    """The configured learner, initialised from `cfg.seed`: `ProtoSeg` or the MAML U-Net."""
    from pipeline.segmentation.maml import build_maml_unet
    from pipeline.segmentation.proto import build_proto_seg

    torch.manual_seed(cfg.seed)
    return build_proto_seg(cfg.segmentation) if cfg.segmentation.method == "proto" else build_maml_unet(
        cfg.segmentation)


def train(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Meta-train on supervoxel pseudo-structures (`supervision: self`) or the training structures."""
    if resume:
        raise FewscanError(f"{run_dir}: --resume is not supported for this task kind yet")
    from monai.losses import DiceCELoss

    from pipeline.segmentation.maml import task_loss

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    set_threads(cfg)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cases = load_cases(cfg)
    split = split_structures(cases, cfg.segmentation.held_out)
    train_cases, test_cases = split_patients(cases, cfg.segmentation.test_patients, cfg.seed)
    write_json({**split, "train_cases": len(train_cases), "test_cases": len(test_cases)}, run_dir / "split.json")
    if cfg.segmentation.supervision == "labels":
        need = cfg.episodes.shots + 1  # K support patients and at least one query patient
        usable = [s for s in split["train"]
                  if len({c.patient_key for c in train_cases if s in c.structures()}) >= need]
        if not usable:
            raise FewscanError(f"supervision: labels needs a training structure present in >= {need} training "
                               f"patients; none is (training structures: {split['train']})")
        split = {**split, "train": usable}
    log.info("structures: train %s | held out %s | %d training scans", split["train"], split["test"],
             len(train_cases))
    model = build_model(cfg)
    save_weights(model, run_dir / "untrained.safetensors")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    curves: dict[str, list[float]] = {"iteration": [], "loss": []}
    window: list[float] = []
    start = time.perf_counter()
    if cfg.segmentation.supervision == "self":
        precompute_supervoxels(train_cases, cfg.segmentation, cfg.episodes.workers)
    stream = SegEpisodes(train_cases, cfg, split, cfg.train.iterations)
    model.train()
    bar = progress(episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch), total=cfg.train.iterations,
                   desc="meta-training", unit="episode")
    for it, (sx, sm, qx, qm) in enumerate(bar):
        if cfg.segmentation.method == "proto":
            loss = loss_fn(model(sx, sm, qx), qm)
        else:
            loss = task_loss(model, cfg.segmentation, sx, sm, qx, qm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            curves["iteration"].append(it + 1)
            curves["loss"].append(float(np.mean(window)))
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}")
            window = []
    save_weights(model, run_dir / "model.safetensors")
    write_json({"iterations": cfg.train.iterations, "seconds": time.perf_counter() - start,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "train_cases": len(train_cases)}, run_dir / "state.json")
    write_json(curves, run_dir / "curves.json")
    return run_dir


