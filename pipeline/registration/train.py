"""Registration meta-training: Reptile (or joint training) of a deformable network on pairs of one or more tasks.

Run directory: `config.yaml`, `split.json` (patient keys per group), `pairs.json` (train / adapt / eval pairs),
`untrained.safetensors`, `model.safetensors`, `state.json`, `curves.json`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from datasets.volume import FewscanError, atomic_path
from pipeline.common.config import Config, to_dict
from pipeline.common.episodes import episode_loader
from pipeline.common.progress import progress
from pipeline.common.report import write_json
from pipeline.common.run import save_weights, seed_everything, set_threads
from pipeline.registration.episodes import (
    SPLITS,
    PairData,
    RegEpisodes,
    fixed_pairs,
    patient_groups,
    registration_tasks,
)
from pipeline.registration.network import (
    Losses,
    RegistrationNet,
    optimiser,
    reptile_step,
    train_steps,
)


def n_labels(pairs: list[dict[str, Any]]) -> int:
    """Number of label values (background included) over the pairs' structure tables."""
    values = [int(k) for p in pairs for k in p["structures"]]
    return max(values, default=0) + 1


def build_net(cfg: Config, shape: tuple[int, ...]) -> RegistrationNet:
    torch.manual_seed(cfg.seed)
    return RegistrationNet(cfg.registration, shape)


# --- training --------------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Meta-train (Reptile, or joint training) on the training pairs; returns the run directory."""
    if resume:
        raise FewscanError(f"{run_dir}: --resume is not supported for this task kind yet")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    set_threads(cfg)
    rcfg = cfg.registration
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json({t.name: patient_groups(t, cfg) for t in registration_tasks(cfg)}, run_dir / "split.json")
    pairs = {split: fixed_pairs(cfg, split) for split in SPLITS}
    write_json(pairs, run_dir / "pairs.json")
    if not pairs["train"] or not pairs["eval"]:
        raise FewscanError(f"{cfg.data.root}: no training or evaluation pairs (check registration.* splits)")
    start = time.perf_counter()
    data = PairData(cfg, pairs["train"])
    prep_seconds = time.perf_counter() - start
    model = build_net(cfg, data.shape)
    save_weights(model, run_dir / "untrained.safetensors")
    losses = Losses(rcfg, n_labels(pairs["train"]))
    stream = RegEpisodes(data, cfg, cfg.train.iterations)
    opt = optimiser(model, cfg.train.lr) if rcfg.meta == "joint" else None
    curves: dict[str, list[float]] = {"iteration": [], "loss": []}
    window: list[float] = []
    inner = None  # Reptile's inner Adam state, carried across tasks
    start = time.perf_counter()
    loader = episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch)
    for it, batches in enumerate(progress(loader, total=cfg.train.iterations, desc=f"meta-training ({rcfg.meta})",
                                          unit="task")):
        if opt is None:  # Reptile: one task = one fixed image, one batch of its pairs per inner step
            steps = iter(batches)
            loss, inner = reptile_step(model, losses, lambda s=steps: next(s), rcfg.inner_steps, cfg.train.lr,
                                       rcfg.meta_lr, inner)
        else:
            loss = train_steps(model, losses, lambda b=batches[0]: b, 1, opt)[0]
        window.append(loss)
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            curves["iteration"].append(it + 1)
            curves["loss"].append(float(np.mean(window)))
            window = []
    save_weights(model, run_dir / "model.safetensors")
    write_json({"iterations": cfg.train.iterations, "seconds": time.perf_counter() - start,
                "prepare_seconds": prep_seconds, "train_pairs": len(pairs["train"]), "tasks": len(stream.groups),
                "volume_size": list(data.shape)}, run_dir / "state.json")
    write_json(curves, run_dir / "curves.json")
    return run_dir


