"""Registration meta-training: Reptile (or joint training) of a deformable network on pairs of one or more tasks.

The loop (curves, `last/` checkpoints, exact resume, final files) is `pipeline.common.loop`; this module gives it
one task's step, and Reptile's inner Adam state as extra checkpoint state. Run directory, besides the loop's files
(`untrained.safetensors`, `model.safetensors`, `state.json` with `volume_size`, `curves.json`,
`learning_curve.png`, `last/`): `config.yaml`, `split.json` (patient keys per group), `pairs.json` (train / adapt
/ eval pairs).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from datasets.volume import FewscanError
from pipeline.common import loop
from pipeline.common.config import Config
from pipeline.common.episodes import episode_loader
from pipeline.common.report import write_json
from pipeline.common.run import write_config
from pipeline.registration.episodes import (
    SPLITS,
    Batch,
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


# --- training ---------------------------------------------------------------------------------------------------
def write_pairs(cfg: Config, run_dir: Path, main: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The fixed pairs of every split; rank 0 writes `split.json` (patient keys) and `pairs.json`."""
    groups = {t.name: patient_groups(t, cfg) for t in registration_tasks(cfg)}
    pairs = {split: fixed_pairs(cfg, split) for split in SPLITS}
    if main:
        write_json(groups, run_dir / "split.json")
        write_json(pairs, run_dir / "pairs.json")
    if not pairs["train"] or not pairs["eval"]:
        raise FewscanError(f"{cfg.data.root}: no training or evaluation pairs (check registration.* splits)")
    return pairs


def train(cfg: Config, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> Path:
    """Meta-train (Reptile, or joint training) on the training pairs (on the CPU); returns the run directory.

    Args:
        cfg: the run config.
        run_dir: output folder; when it holds `last/state.json`, training resumes from there.
        resume: require a checkpoint to resume from (error when there is none).
        stop_at: stop after this iteration as if interrupted (writes `last/`; for tests and time-boxed runs).
    """
    session = loop.begin(cfg, run_dir, resume, device=torch.device("cpu"))
    rcfg = cfg.registration
    if session.world.main:
        write_config(cfg, session.run_dir)
    pairs = write_pairs(cfg, session.run_dir, session.world.main)
    start = time.perf_counter()
    data = PairData(cfg, pairs["train"])
    prep_seconds = time.perf_counter() - start
    model = build_net(cfg, data.shape)
    losses = Losses(rcfg, n_labels(pairs["train"]))
    stream = RegEpisodes(data, cfg, cfg.train.iterations)
    opt = optimiser(model, cfg.train.lr) if rcfg.meta == "joint" else None
    carried: dict[str, Any] = {"inner": None}  # Reptile's inner Adam state, carried across tasks (and resumes)

    def batches(start: int) -> Iterator[list[Batch]]:
        stream.start = start
        return iter(episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch))

    def step(it: int, task: list[Batch]) -> dict[str, float]:
        if opt is None:  # Reptile: one task = one fixed image, one batch of its pairs per inner step
            steps = iter(task)
            loss, carried["inner"] = reptile_step(model, losses, lambda: next(steps), rcfg.inner_steps,
                                                  cfg.train.lr, rcfg.meta_lr, carried["inner"])
        else:
            loss = train_steps(model, losses, lambda: task[0], 1, opt)[0]
        return {"loss": loss}

    info = {"prepare_seconds": prep_seconds, "train_pairs": len(pairs["train"]), "tasks": len(stream.groups),
            "volume_size": list(data.shape)}
    return loop.run(session, loop.Task(model, batches, step, opt, state=lambda: dict(carried),
                                       load_state=carried.update, info=lambda: info,
                                       desc=f"meta-training ({rcfg.meta})", unit="task"), stop_at)
