"""Classification meta-training: meta-batches of base-class episodes, validated on the validation classes.

The loop itself (curves, TensorBoard, validation, `best/` and `last/` checkpoints, exact resume, torchrun ranks,
final files) is `pipeline.common.loop`; this module gives it one meta-iteration (`meta_step`) and the validation
accuracy. Run directory (rank 0 writes), besides the loop's files: `config.yaml` (resolved), `manifest.csv` (TCIA
sources), `split.json`; `untrained.safetensors` is the baseline every report compares against, and
`state.json` records the training item shape `adapt` needs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classification.data import Items, open_source
from pipeline.classification.episodes import Episode, EpisodeDataset, EpisodeSampler, source_split, split_groups
from pipeline.classification.methods import build_method
from pipeline.common import distributed, loop
from pipeline.common.config import Config
from pipeline.common.episodes import episode_loader, stream_seed
from pipeline.common.report import write_json
from pipeline.common.run import read_split, write_config
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


def vectorised(model: nn.Module, cfg: Config) -> bool:
    """Whether the tasks of a meta-batch go through `vmap_task_losses` (`method.vmap` and the method has it)."""
    return cfg.method.vmap and getattr(model, "vmap_task_losses", None) is not None


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
    if vectorised(model, cfg):
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


# --- data and task -----------------------------------------------------------------------------------------------
@dataclass
class ClassData:
    """A run's class split and items: the base items train, the validation items validate (None: no validation)."""

    split: dict[str, Any]
    items: Items
    val_items: Items | None
    val_ways: int


def load_data(cfg: Config, session: loop.Session) -> ClassData:
    """Split the classes (a resumed run reads its `split.json`) and load the items; rank 0 writes `split.json` and
    `config.yaml` (with `model.in_channels` set from the data)."""
    run_dir = session.run_dir
    source = open_source(cfg, run_dir if session.world.main else None)
    split = read_split(run_dir) if session.resuming else source_split(cfg, source)
    items = source.items(split["base"], split_groups(split, "base"))
    val_ways = min(cfg.episodes.ways, len(split["validation"]))
    if cfg.train.val_every and split["validation"] and val_ways < 2:
        log.warning("validation skipped: it needs at least 2 validation classes, got %s", split["validation"])
    val_items = (source.items(split["validation"], split_groups(split, "validation"))
                 if val_ways >= 2 and cfg.train.val_every else None)
    cfg.model.in_channels = int(items.x.shape[1])  # the data decides; recorded in config.yaml
    if session.world.main:
        write_json(split, run_dir / "split.json")
        write_config(cfg, run_dir)
    log.info("classes: base %s | validation %s | novel %s", split["base"], split["validation"], split["novel"])
    return ClassData(split, items, val_items, val_ways)


def summarise(window: loop.Window) -> dict[str, float]:
    """Mean query loss per task and query accuracy over the log window (sums of `meta_step`'s numbers)."""
    return {"loss": sum(window["loss"]) / max(sum(window["tasks"]), 1),
            "accuracy": sum(window["correct"]) / max(sum(window["count"]), 1)}


def meta_batches(episodes: Iterator[tuple[torch.Tensor, ...]], size: int) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Consecutive episodes of a stream in lists of `size` (one meta-batch per iteration)."""
    while True:
        yield [next(episodes) for _ in range(size)]


def encoder_of(model: nn.Module) -> nn.Module:
    """The feature extractor inside a method: `model.encoder`, or the first layer of MAML's `net`."""
    return model.encoder if hasattr(model, "encoder") else model.net[0]


def pretrain_batch(items: Items, base_y: torch.Tensor, size: int, seed: int, it: int,
                   augment: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-training batch `it`: `size` base items `(B, C, *spatial)` and their base-class indices `(B,)`, a pure
    function of `(seed, it)` so that a resume replays it."""
    rng = np.random.default_rng([stream_seed(seed, "pretrain"), it])
    idx = torch.from_numpy(rng.choice(len(base_y), size=min(size, len(base_y)), replace=False))
    x = items.x[idx]
    return (augment(x, rng) if augment is not None else x), base_y[idx]


def build_task(cfg: Config, session: loop.Session, data: ClassData) -> loop.Task:
    """The model, its Adam, the training episode stream, one meta-iteration and validation, for the loop.

    With `train.pretrain_iterations`, the first iterations are Meta-Baseline's supervised pre-training instead:
    cross-entropy of a linear head over all base classes on `train.pretrain_batch` items; the head lives in the
    optimiser and the checkpoint's task state only, never in the model's weights.
    """
    world, device, ep_cfg = session.world, session.device, cfg.episodes
    model = build_model(cfg, n_base=len(data.split["base"])).to(device)
    if getattr(model, "parallel_tasks", False) and not vectorised(model, cfg) and task_threads(cfg, device, world) > 1:
        torch.set_num_threads(1)  # one intra-op thread per task thread: OpenMP teams per thread oversubscribe cores
    pretrain, base_index = cfg.train.pretrain_iterations, {name: i for i, name in enumerate(data.split["base"])}
    head = nn.Linear(encoder_of(model).out_dim, len(base_index)).to(device) if pretrain else None
    params = [*model.parameters(), *(head.parameters() if head is not None else [])]
    opt = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ways, meta_batch = cfg.train.ways or ep_cfg.ways, cfg.method.meta_batch

    from transforms.augment import build_augmenter

    augment = build_augmenter(cfg.transforms.augment, data.items.x.ndim - 2)
    dataset = EpisodeDataset(data.items.x, data.items.labels, data.items.groups, data.split["base"], ways,
                             ep_cfg.shots, ep_cfg.queries, seed=cfg.seed, augment=augment)
    base_y = torch.tensor([base_index[c] for c in data.items.labels])

    def batches(start: int) -> Iterator[Any]:
        for it in range(start, pretrain):
            yield pretrain_batch(data.items, base_y, cfg.train.pretrain_batch, cfg.seed, it, augment)
        dataset.start = max(start, pretrain) * meta_batch  # episode i is fixed by (seed, i): a resume replays it
        yield from meta_batches(iter(episode_loader(dataset, ep_cfg.workers, ep_cfg.prefetch)), meta_batch)

    def pretrain_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        mine = world.mine(len(y))  # torchrun: each rank takes its share of the batch, gradients are summed
        logits = head(encoder_of(model)(x[mine].to(device)))
        loss = F.cross_entropy(logits, y[mine].to(device), reduction="sum") / len(y)
        loss.backward()
        distributed.all_reduce_grads(model, world)
        distributed.all_reduce_grads(head, world)
        opt.step()
        correct = float((logits.argmax(-1).cpu() == y[mine]).sum())
        loss_sum, correct = all_sum([float(loss.detach()), correct], world)
        return {"loss": loss_sum, "correct": correct, "count": len(y), "tasks": 1}

    def step(it: int, episodes: Any) -> dict[str, float]:
        if it < pretrain:
            return pretrain_step(*episodes)
        tasks = [(sx.to(device), sy.to(device), qx.to(device), qy.to(device),
                  torch.tensor([base_index[c] for c in dataset.episode(it * meta_batch + t).classes], device=device))
                 for t, (sx, sy, qx, qy) in enumerate(episodes)]
        opt.zero_grad(set_to_none=True)
        model.meta_iteration = it  # for schedules over training (MAML++'s multi-step loss weights)
        loss_sum, correct, count = meta_step(model, tasks, ways, cfg, world)
        distributed.all_reduce_grads(model, world)
        opt.step()
        loss_sum, correct, count = all_sum([loss_sum, correct, count], world)
        return {"loss": loss_sum, "correct": correct, "count": count, "tasks": meta_batch}

    validate, untrained = None, {}
    if data.val_items is not None:
        val_items = data.val_items
        val_episodes = EpisodeSampler(val_items.labels, val_items.groups, data.split["validation"], data.val_ways,
                                      ep_cfg.shots, ep_cfg.queries,
                                      seed=stream_seed(cfg.seed, "validation")).fixed(cfg.train.val_episodes)
        validate = partial(validate_accuracy, model, val_items, val_episodes, cfg, device, world)
        # the model holds its initial weights until the loop starts (a resume loads `last/` only then): the score
        # training must beat, for the end-of-run warning (`no_gain_warning`)
        untrained["untrained_validation"] = validate()
    state = load_state = None
    if head is not None:
        state = lambda: {"pretrain_head": head.state_dict()}  # noqa: E731
        load_state = lambda s: head.load_state_dict(s["pretrain_head"])  # noqa: E731
    return loop.Task(model, batches, step, opt, metrics=("loss", "accuracy"), summarise=summarise,
                     validate=validate, val_metric="accuracy", record={"split": data.split},
                     state=state, load_state=load_state,
                     info=lambda: {"items": len(data.items.labels), "item_shape": list(data.items.x.shape[1:]),
                                   **untrained})


def no_gain_warning(state: dict[str, Any]) -> str | None:
    """The end-of-training warning when no validation beat the untrained encoder's validation accuracy.

    Args:
        state: the run's `state.json`: `best` (the best validation accuracy, None without validation) and
            `untrained_validation` (absent without validation classes).

    Returns:
        One line saying what to do, or None (validation improved on untrained, or there was none to compare).
    """
    best, untrained = state.get("best"), state.get("untrained_validation")
    if best is None or untrained is None or best > untrained:
        return None
    return (f"validation accuracy never beat the untrained encoder's (best {best:.3f}, untrained {untrained:.3f}): "
            f"{NO_GAIN_ADVICE}")


# What to do when training did not beat the untrained encoder (train's warning, evaluate's flag)
NO_GAIN_ADVICE = ("check the learning curve, raise train.iterations or lower train.lr, give training more base "
                  "classes, or try configs/classify_finetune.yaml; do not adapt with this run yet")


# --- the entry point ---------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> Path:
    """Meta-train on the base classes; returns the run directory.

    Args:
        cfg: the run config.
        run_dir: output folder; when it holds `last/state.json`, training resumes from there.
        resume: require a checkpoint to resume from (error when there is none).
        stop_at: stop after this iteration as if interrupted (writes `last/`; for tests and time-boxed runs).
    """
    session = loop.begin(cfg, run_dir, resume)
    loop.run(session, build_task(cfg, session, load_data(cfg, session)), stop_at)
    final = session.run_dir / "state.json"  # written when the run completes, not at a `stop_at` interruption
    if session.world.main and (stop_at is None or stop_at >= cfg.train.iterations) and final.is_file():
        warning = no_gain_warning(json.loads(final.read_text()))
        if warning:
            log.warning("WARNING: %s", warning)
    return session.run_dir
