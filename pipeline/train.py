"""Meta-training: sample base-class episodes, step the optimiser, write the run directory.

Run directory: `config.yaml` (resolved), `manifest.csv`, `split.json`, `untrained.safetensors` (the seeded
initial weights, the baseline every report compares against), `model.safetensors`, `state.json`,
`curves.json` and `learning_curve.png`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from datasets.volume import atomic_path
from pipeline.config import Config, to_dict
from pipeline.data import Items, open_source
from pipeline.encoders import build_encoder
from pipeline.episodes import Episode, EpisodeSampler, split_classes
from pipeline.methods import build_method
from pipeline.report import plot_curves, write_json

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: Config) -> nn.Module:
    """Encoder wrapped by the configured method, initialised from `cfg.seed`."""
    torch.manual_seed(cfg.seed)
    return build_method(cfg, build_encoder(cfg.model, in_channels=1))


def episode_batch(items: Items, ep: Episode, shots: int, queries: int,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """Tensors of one episode: support `(N*K, 1, *roi)`, support labels `(N*K,)`, query, query labels."""
    sy, qy = ep.labels(shots, queries)
    return (items.x[list(ep.support)].to(device), torch.as_tensor(sy, device=device),
            items.x[list(ep.query)].to(device), torch.as_tensor(qy, device=device))


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomic safetensors write of a state dict."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into `model` (strict)."""
    model.load_state_dict(load_file(str(path)))
    return model


def train(cfg: Config, run_dir: Path) -> Path:
    """Meta-train on the base classes; returns the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.train.device)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    source = open_source(cfg, run_dir)
    split = split_classes(source.classes, cfg.split.novel, cfg.split.validation)
    write_json(split, run_dir / "split.json")
    log.info("classes: base %s | novel %s", split["base"], split["novel"])
    items = source.items(split["base"])

    model = build_model(cfg).to(device)
    save_weights(model, run_dir / "untrained.safetensors")
    ep_cfg = cfg.episodes
    ways = cfg.train.ways or ep_cfg.ways
    sampler = EpisodeSampler(items.labels, items.groups, split["base"], ways, ep_cfg.shots, ep_cfg.queries,
                             seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    curves: dict[str, list[float]] = {"iteration": [], "loss": [], "accuracy": []}
    window_loss, window_acc = [], []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.train.iterations), desc="meta-training", unit="episode")
    for it in bar:
        sx, sy, qx, qy = episode_batch(items, sampler.sample(), ep_cfg.shots, ep_cfg.queries, device)
        logits = model(sx, sy, qx, ways)
        loss = F.cross_entropy(logits, qy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window_loss.append(loss.item())
        window_acc.append((logits.argmax(-1) == qy).float().mean().item())
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            curves["iteration"].append(it + 1)
            curves["loss"].append(float(np.mean(window_loss)))
            curves["accuracy"].append(float(np.mean(window_acc)))
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}", acc=f"{curves['accuracy'][-1]:.2f}")
            window_loss, window_acc = [], []

    save_weights(model, run_dir / "model.safetensors")
    write_json({"iterations": cfg.train.iterations, "seconds": time.perf_counter() - start,
                "device": str(device), "items": len(items.labels)}, run_dir / "state.json")
    write_json(curves, run_dir / "curves.json")
    if curves["iteration"]:
        plot_curves(curves, run_dir / "learning_curve.png")
    return run_dir


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was trained with."""
    from pipeline.config import validate

    return validate(yaml.safe_load((run_dir / "config.yaml").read_text()), source=str(run_dir / "config.yaml"))


def read_split(run_dir: Path) -> dict[str, list[str]]:
    """The class split written at training time."""
    return json.loads((run_dir / "split.json").read_text())
