"""Segmentation meta-training: supervoxel pseudo-structures (self-supervised) or the training structures.

The loop (curves, `last/` checkpoints, exact resume, final files) is `pipeline.common.loop`; this module gives it
one episode's step. Run directory, besides the loop's files (`untrained.safetensors`, `model.safetensors`,
`state.json`, `curves.json`, `learning_curve.png`, `last/`): `config.yaml`, `split.json` (train/test structures
and case counts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasets.volume import FewscanError
from pipeline.common import loop
from pipeline.common.config import Config
from pipeline.common.episodes import episode_loader
from pipeline.common.report import write_json
from pipeline.common.run import write_config
from pipeline.segmentation.data import Case, load_cases, split_patients, split_structures
from pipeline.segmentation.episodes import SegEpisodes, precompute_supervoxels

log = logging.getLogger(__name__)


def build_model(cfg: Config) -> nn.Module:
    """The configured learner, initialised from `cfg.seed`: `ProtoSeg` or the MAML U-Net."""
    from pipeline.segmentation.maml import build_maml_unet
    from pipeline.segmentation.proto import build_proto_seg

    torch.manual_seed(cfg.seed)
    return build_proto_seg(cfg.segmentation) if cfg.segmentation.method == "proto" else build_maml_unet(
        cfg.segmentation)


def training_split(cfg: Config, run_dir: Path,
                   main: bool = True) -> tuple[dict[str, list[str]], list[Case], list[Case]]:
    """The structures episodes train on, the training cases and all cases; rank 0 writes `split.json`.

    With `supervision: labels` only structures present in at least K + 1 training patients (K support, one
    query) are kept.
    """
    cases = load_cases(cfg)
    split = split_structures(cases, cfg.segmentation.held_out)
    train_cases, test_cases = split_patients(cases, cfg.segmentation.test_patients, cfg.seed)
    if main:
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
    return split, train_cases, cases


def train(cfg: Config, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> Path:
    """Meta-train on supervoxel pseudo-structures (`supervision: self`) or the training structures, on
    `train.device`.

    Args:
        cfg: the run config.
        run_dir: output folder; when it holds `last/state.json`, training resumes from there.
        resume: require a checkpoint to resume from (error when there is none).
        stop_at: stop after this iteration as if interrupted (writes `last/`; for tests and time-boxed runs).
    """
    from monai.losses import DiceCELoss

    from pipeline.segmentation.maml import task_loss

    session = loop.begin(cfg, run_dir, resume)
    if session.world.main:
        write_config(cfg, session.run_dir)
    split, train_cases, cases = training_split(cfg, session.run_dir, session.world.main)
    if cfg.segmentation.method == "propagate":  # a registration network, trained on the images alone
        from pipeline.segmentation.propagate import network_grid, train_propagation

        grid = network_grid([c.image.shape for c in cases], cfg.registration)  # shapes only: no labels
        return train_propagation(cfg, session, train_cases, grid, stop_at)
    model = build_model(cfg).to(session.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if cfg.segmentation.supervision == "self":
        precompute_supervoxels(train_cases, cfg.segmentation, cfg.episodes.workers)

    def batches(start: int) -> Iterator[Any]:
        stream = SegEpisodes(train_cases, cfg, split, cfg.train.iterations, start)
        return iter(episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch))

    def step(it: int, episode: tuple[torch.Tensor, ...]) -> dict[str, float]:
        sx, sm, qx, qm = (t.to(session.device) for t in episode)  # episodes are cut on the CPU
        if cfg.segmentation.method == "proto":
            loss = loss_fn(model(sx, sm, qx), qm)
        else:
            loss = task_loss(model, cfg.segmentation, sx, sm, qx, qm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    return loop.run(session, loop.Task(model, batches, step, opt, unit="episode",
                                       info=lambda: {"train_cases": len(train_cases)}), stop_at)
