"""Classification meta-training: meta-batches of base-class episodes, validation, checkpoints, exact resume.

Run directory (rank 0 writes): `config.yaml` (resolved), `manifest.csv` (TCIA sources), `split.json`,
`untrained.safetensors` (the seeded initial weights, the baseline every report compares against),
`model.safetensors` (the best validation weights, else the last), `state.json`, `curves.json`,
`learning_curve.png`, `tensorboard/` (scalars), and the checkpoints `last/` and `best/`, each
`model.safetensors` + `optimizer.safetensors` + `state.json` (iteration, RNG states, optimiser settings,
curves, config, split). Training episodes are a pure function of their index (`EpisodeDataset`), so a resume
from `last/` replays exactly the episodes an uninterrupted run would have seen, and gives identical weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datasets.volume import FewscanError, atomic_path
from pipeline.classification.data import Items, open_source
from pipeline.classification.episodes import Episode, EpisodeDataset, EpisodeSampler, source_split, split_groups
from pipeline.classification.methods import build_method
from pipeline.common import distributed
from pipeline.common.config import Config, to_dict
from pipeline.common.episodes import episode_loader, stream_seed
from pipeline.common.progress import progress
from pipeline.common.report import plot_curves, write_json
from pipeline.common.run import (
    load_checkpoint,
    pick_device,
    save_checkpoint,
    save_weights,
    seed_everything,
    set_threads,
)
from pipeline.nn.encoders import build_encoder
from pipeline.nn.inner import threaded_task_grads

log = logging.getLogger(__name__)







def build_model(cfg: Config, n_base: int = 1) -> nn.Module:
    """Encoder wrapped by the configured method, initialised from `cfg.seed`; `n_base` sizes a fine-tune head."""
    torch.manual_seed(cfg.seed)
    return build_method(cfg, build_encoder(cfg.model), n_base)


def episode_batch(items: Items, ep: Episode, shots: int, queries: int,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """Tensors of one episode: support `(N*K, C, *spatial)`, support labels `(N*K,)`, query, query labels."""
    sy, qy = ep.labels(shots, queries)
    # stacking per-item views is much cheaper than a fancy-index gather on a loaded CPU (benchmarks/README.md)
    sx, qx = torch.stack([items.x[i] for i in ep.support]), torch.stack([items.x[i] for i in ep.query])
    return (sx.to(device), torch.as_tensor(sy, device=device), qx.to(device), torch.as_tensor(qy, device=device))










def task_threads(cfg: Config, device: torch.device, world: distributed.World) -> int:
    """Threads for the tasks of a meta-batch (`method.task_threads`; 0: this process's share of the CPU cores
    it may run on, at most its tasks). Always 1 off the CPU."""
    if device.type != "cpu":
        return 1
    if cfg.method.task_threads:
        return cfg.method.task_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // world.size, len(world.mine(cfg.method.meta_batch))))


# --- one meta-iteration ----------------------------------------------------------------------------------------
def meta_step(model: nn.Module, tasks: list[tuple[torch.Tensor, ...]], n_way: int, cfg: Config,
              world: distributed.World) -> tuple[float, float, float]:
    """Accumulate this rank's share of the meta-batch gradient; returns (loss sum, correct, queries) of its tasks.

    `tasks`: the whole meta-batch, each `(sx, sy, qx, qy, classes)` on the device; this rank takes
    `world.mine(len(tasks))`. Each task's loss is divided by the meta-batch size, so gradients summed over
    tasks and ranks are the meta-batch mean.
    """
    mine = [tasks[t] for t in world.mine(len(tasks))]
    loss_sum = correct = count = 0.0
    if not mine:
        return loss_sum, correct, count
    if cfg.method.vmap and hasattr(model, "vmap_task_losses"):
        sx, sy, qx, qy = (torch.stack([t[i] for t in mine]) for i in range(4))
        losses, logits = model.vmap_task_losses(sx, sy, qx, qy, n_way)
        (losses.sum() / len(tasks)).backward()
        return (float(losses.detach().sum()), float((logits.argmax(-1) == qy).sum()), float(qy.numel()))
    threads = task_threads(cfg, mine[0][0].device, world)
    if threads > 1 and getattr(model, "parallel_tasks", False) and len(mine) > 1:
        def one(replica: nn.Module, task: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            out = replica.task_loss(*task[:4], n_way, classes=task[4])
            return out.loss / len(tasks), out.logits.detach()

        logits = threaded_task_grads(model, mine, one, threads)
    else:
        logits = []
        for sx, sy, qx, qy, classes in mine:
            out = model.task_loss(sx, sy, qx, qy, n_way, classes=classes)
            (out.loss / len(tasks)).backward()
            logits.append(out.logits.detach())
    for (_, _, _, qy, _), lg in zip(mine, logits, strict=True):
        loss_sum += float(F.cross_entropy(lg, qy))
        correct += float((lg.argmax(-1) == qy).sum())
        count += qy.numel()
    return loss_sum, correct, count


@torch.no_grad()
def validate_accuracy(model: nn.Module, items: Items, episodes: list[Episode], cfg: Config,
                      device: torch.device, world: distributed.World) -> float:
    """Mean query accuracy over fixed validation episodes (shared across ranks)."""
    model.eval()
    total = 0.0
    for k in world.mine(len(episodes)):
        ep = episodes[k]
        sx, sy, qx, qy = episode_batch(items, ep, cfg.episodes.shots, cfg.episodes.queries, device)
        total += float((model(sx, sy, qx, len(ep.classes)).argmax(-1) == qy).float().mean())
    model.train()
    return all_sum([total], world)[0] / len(episodes)


def all_sum(values: list[float], world: distributed.World) -> list[float]:
    return distributed.all_reduce_sum(values, world)


# --- the loop --------------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> Path:
    """Meta-train on the base classes; returns the run directory.

    Args:
        cfg: the run config.
        run_dir: output folder; when it holds `last/state.json`, training resumes from there.
        resume: require a checkpoint to resume from (error when there is none).
        stop_at: stop after this iteration as if interrupted (writes `last/`; for tests and time-boxed runs).
    """
    world, device = distributed.init(pick_device(cfg.train.device))
    last = run_dir / "last"
    resuming = (last / "state.json").is_file()
    if resume and not resuming:
        raise FewscanError(f"{run_dir}: nothing to resume (no last/state.json)")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    set_threads(cfg)

    source = open_source(cfg, run_dir if world.main else None)
    split = json.loads((run_dir / "split.json").read_text()) if resuming else source_split(cfg, source)
    items = source.items(split["base"], split_groups(split, "base"))
    val_ways = min(cfg.episodes.ways, len(split["validation"]))
    if cfg.train.val_every and split["validation"] and val_ways < 2:
        log.warning("validation skipped: it needs at least 2 validation classes, got %s", split["validation"])
    val_items = (source.items(split["validation"], split_groups(split, "validation"))
                 if val_ways >= 2 and cfg.train.val_every else None)
    cfg.model.in_channels = int(items.x.shape[1])  # the data decides; recorded in config.yaml
    if world.main:
        write_json(split, run_dir / "split.json")
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info("classes: base %s | validation %s | novel %s", split["base"], split["validation"], split["novel"])

    model = build_model(cfg, n_base=len(split["base"])).to(device)
    threaded = getattr(model, "parallel_tasks", False) and not (cfg.method.vmap and hasattr(model, "vmap_task_losses"))
    if threaded and task_threads(cfg, device, world) > 1:
        torch.set_num_threads(1)  # one intra-op thread per task thread: OpenMP teams per thread oversubscribe cores
    if world.main and not resuming:
        save_weights(model, run_dir / "untrained.safetensors")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ep_cfg, tr = cfg.episodes, cfg.train
    ways = tr.ways or ep_cfg.ways
    meta_batch = cfg.method.meta_batch

    state: dict[str, Any] = {"iteration": 0, "best": None, "best_iteration": None, "bad_validations": 0,
                             "curves": {"iteration": [], "loss": [], "accuracy": [], "val_iteration": [],
                                        "val_accuracy": []}, "window": [0.0, 0.0, 0.0, 0], "seconds": 0.0}
    if resuming:
        state.update(load_checkpoint(last, model, opt))
        log.info("resuming from %s at iteration %d", last, state["iteration"])
    distributed.broadcast_params(model, world)

    from transforms.augment import build_augmenter

    augment = build_augmenter(cfg.transforms.augment, items.x.ndim - 2)
    dataset = EpisodeDataset(items.x, items.labels, items.groups, split["base"], ways, ep_cfg.shots,
                             ep_cfg.queries, seed=cfg.seed, augment=augment)
    base_index = {name: i for i, name in enumerate(split["base"])}
    start = state["iteration"]
    # Episode i of the stream is fixed by (seed, i): skipping to the resume point replays the same stream.
    stream = itertools.islice(iter(episode_loader(dataset, ep_cfg.workers, ep_cfg.prefetch)),
                              start * meta_batch, None)
    val_episodes = (EpisodeSampler(val_items.labels, val_items.groups, split["validation"], val_ways,
                                   ep_cfg.shots, ep_cfg.queries, seed=stream_seed(cfg.seed, "validation"))
                    .fixed(tr.val_episodes) if val_items is not None else [])

    writer = None
    if world.main and tr.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
    curves = state["curves"]
    began = time.perf_counter() - state["seconds"]
    end = tr.iterations if stop_at is None else min(stop_at, tr.iterations)
    model.train()
    bar = progress(range(start, end), desc="meta-training", unit="it", disable=not world.main, initial=start,
                   total=tr.iterations)
    stopped_early = False

    def checkpoint(it: int) -> None:
        state.update(iteration=it, seconds=time.perf_counter() - began)
        if world.main:
            save_checkpoint(last, model, opt, {**state, "config": to_dict(cfg), "split": split})

    for it in bar:
        tasks = []
        for t in range(meta_batch):
            sx, sy, qx, qy = next(stream)
            classes = dataset.episode(it * meta_batch + t).classes
            tasks.append((sx.to(device), sy.to(device), qx.to(device), qy.to(device),
                          torch.tensor([base_index[c] for c in classes], device=device)))
        opt.zero_grad(set_to_none=True)
        loss_sum, correct, count = meta_step(model, tasks, ways, cfg, world)
        distributed.all_reduce_grads(model, world)
        opt.step()
        loss_sum, correct, count = all_sum([loss_sum, correct, count], world)
        w = state["window"]
        state["window"] = [w[0] + loss_sum, w[1] + correct, w[2] + count, w[3] + meta_batch]
        done = it + 1
        if done % tr.log_every == 0 or done == tr.iterations:
            w = state["window"]
            curves["iteration"].append(done)
            curves["loss"].append(w[0] / max(w[3], 1))
            curves["accuracy"].append(w[1] / max(w[2], 1))
            state["window"] = [0.0, 0.0, 0.0, 0]
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}", acc=f"{curves['accuracy'][-1]:.2f}")
            if writer:
                writer.add_scalar("train/loss", curves["loss"][-1], done)
                writer.add_scalar("train/accuracy", curves["accuracy"][-1], done)
        if val_episodes and (done % tr.val_every == 0 or done == tr.iterations):
            acc = validate_accuracy(model, val_items, val_episodes, cfg, device, world)
            curves["val_iteration"].append(done)
            curves["val_accuracy"].append(acc)
            if writer:
                writer.add_scalar("validation/accuracy", acc, done)
            if state["best"] is None or acc > state["best"]:
                state.update(best=acc, best_iteration=done, bad_validations=0)
                if world.main:
                    save_checkpoint(run_dir / "best", model, opt, {**state, "iteration": done})
            else:
                state["bad_validations"] += 1
                if tr.patience and state["bad_validations"] >= tr.patience:
                    log.info("early stop at iteration %d: no validation gain in %d checks (best %.3f at %d)",
                             done, tr.patience, state["best"], state["best_iteration"])
                    stopped_early = True
        if done % tr.checkpoint_every == 0 or done == end or stopped_early:
            checkpoint(done)
        if stopped_early:
            break
    bar.close()
    if writer:
        writer.close()

    finished = stopped_early or state["iteration"] >= tr.iterations or start >= tr.iterations
    if world.main and finished:
        best = run_dir / "best" / "model.safetensors"
        final = best if best.is_file() else last / "model.safetensors"
        if final.is_file():
            with atomic_path(run_dir / "model.safetensors") as tmp:
                tmp.write_bytes(final.read_bytes())
        else:  # zero iterations: the untrained weights are the model
            save_weights(model, run_dir / "model.safetensors")
        write_json({"iterations": state["iteration"], "stopped_early": stopped_early, "best": state["best"],
                    "best_iteration": state["best_iteration"], "seconds": time.perf_counter() - began,
                    "device": str(device), "processes": world.size, "items": len(items.labels),
                    "item_shape": list(items.x.shape[1:])},
                   run_dir / "state.json")
        write_json(curves, run_dir / "curves.json")
        if curves["iteration"]:
            plot_curves(curves, run_dir / "learning_curve.png")
    distributed.finish(world)
    return run_dir






