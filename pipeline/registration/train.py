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
from pipeline.common.run import set_threads, write_config
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
def plan_pairs(cfg: Config) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[dict[str, Any]]]]:
    """The patient groups of every task and the fixed pairs of every split; nothing is written.

    Raises:
        FewscanError: no training or no evaluation pairs.
    """
    groups = {t.name: patient_groups(t, cfg) for t in registration_tasks(cfg)}
    pairs = {split: fixed_pairs(cfg, split) for split in SPLITS}
    if not pairs["train"] or not pairs["eval"]:
        raise FewscanError(f"{cfg.data.root}: no training or evaluation pairs (check registration.* splits)")
    return groups, pairs


def training_data(cfg: Config, pairs: list[dict[str, Any]]) -> PairData:
    """The prepared training pairs, checked to suit the network.

    Raises:
        FewscanError: volumes of several shapes, or a shape the network cannot take (`transforms.volume_size`
            unset; a set one is checked with the config).
    """
    data = PairData(cfg, pairs)
    problem = cfg.registration.grid_problem(data.shape)
    if problem is not None:
        raise FewscanError(f"{cfg.data.root}: the prepared volume size {problem}")
    return data


def train(cfg: Config, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> Path:
    """Meta-train (Reptile, or joint training) on the training pairs (on the CPU); returns the run directory.

    Pairs and training volumes are read and checked before anything is written, so a refused run leaves no run
    directory behind.

    Args:
        cfg: the run config.
        run_dir: output folder; when it holds `last/state.json`, training resumes from there.
        resume: require a checkpoint to resume from (error when there is none).
        stop_at: stop after this iteration as if interrupted (writes `last/`; for tests and time-boxed runs).
    """
    rcfg = cfg.registration
    loop.check_resume(run_dir, resume)
    set_threads(cfg)  # preparation (MONAI transforms, SimpleITK pre-alignment) on the configured CPU budget
    start = time.perf_counter()
    groups, pairs = plan_pairs(cfg)
    data = training_data(cfg, pairs["train"])
    prep_seconds = time.perf_counter() - start
    session = loop.begin(cfg, run_dir, resume)  # cfg.train.device (auto: CUDA when present)
    if session.world.main:
        write_config(cfg, session.run_dir)
        write_json(groups, session.run_dir / "split.json")
        write_json(pairs, session.run_dir / "pairs.json")
    model = build_net(cfg, data.shape).to(session.device)
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
