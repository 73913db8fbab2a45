"""The one training loop of every task kind: log window and curves, TensorBoard, validation with `best/` and early
stopping, `last/` checkpoints and exact resume, torchrun ranks, and the run directory's final files.

A task kind describes one training iteration with a `Task` (its model, optimiser, training stream and a few small
functions) and hands it over:

    session = begin(cfg, run_dir, resume)      # ranks, device, seeds, threads; --resume needs a last/ checkpoint
    ...                                        # the task kind reads its data, builds model and optimiser
    run(session, Task(model, batches, step, optimizer, ...), stop_at)

Run directory (rank 0 writes): `untrained.safetensors` (the initial weights), `model.safetensors` (the best
validation weights, else the last), `state.json`, `curves.json`, `learning_curve.png`, `tensorboard/` (scalars,
`train.tensorboard`), and the checkpoints `last/` (every `train.checkpoint_every` iterations and at a stop) and
`best/` (at each validation gain), each `model.safetensors` + `optimizer.safetensors` + `state.json` (+
`extra.safetensors`, the task's own state). Training items are a pure function of their index (`EpisodeStream`),
so a resume from `last/` replays exactly the stream an uninterrupted run would have seen, and gives identical
weights.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.volume import FewscanError, atomic_path
from pipeline.common import distributed
from pipeline.common.config import Config, to_dict
from pipeline.common.progress import progress
from pipeline.common.report import plot_curves, write_json
from pipeline.common.run import (
    load_checkpoint,
    pick_device,
    recover_checkpoint,
    save_checkpoint,
    save_weights,
    seed_everything,
    set_rng_state,
    set_threads,
)

log = logging.getLogger(__name__)

Window = dict[str, list[float]]


def mean_window(window: Window) -> dict[str, float]:
    """The default log summary: the mean of each value over the iterations of the window."""
    return {k: float(np.mean(v)) for k, v in window.items()}


@dataclass
class Session:
    """Where training runs: the config, run directory, this process's rank and device, and whether it resumes."""

    cfg: Config
    run_dir: Path
    world: distributed.World
    device: torch.device
    resuming: bool


@dataclass
class Task:
    """What a task kind hands the loop: small functions around its model.

    Attributes:
        model: the trained module (its weights are what the run saves).
        batches: `batches(start)`: an iterator over the training items of iterations `start, start + 1, ...`
            (one item per iteration; create the iterator eagerly, before the loop draws from it).
        step: `step(iteration, item)`: one optimisation step on `item`; returns this iteration's numbers for the
            log window (e.g. `{"loss": 0.7}`), already summed over ranks.
        optimizer: checkpointed with the model (None: the task steps the model itself, e.g. Reptile).
        metrics: the curve names `summarise` returns, in curve order.
        summarise: log window (each key: its values, one per iteration) -> `{metric: value}` for the curves.
        validate: the validation score (higher is better); None: no validation, no `best/`, no early stopping.
        val_metric: the name of that score in the curves (`val_<name>`) and TensorBoard.
        state, load_state: the task's own state beyond model and optimiser (nested dicts/lists of tensors and
            JSON values, e.g. registration's Reptile inner Adam state), saved in `last/` and restored on resume.
        record: more entries for `last/state.json` (e.g. the class split).
        info: more entries for the run's final `state.json` (called at the end).
        desc, unit: the progress bar's label and unit.
    """

    model: nn.Module
    batches: Callable[[int], Iterator[Any]]
    step: Callable[[int, Any], dict[str, float]]
    optimizer: torch.optim.Optimizer | None = None
    metrics: tuple[str, ...] = ("loss",)
    summarise: Callable[[Window], dict[str, float]] = mean_window
    validate: Callable[[], float] | None = None
    val_metric: str | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    info: Callable[[], dict[str, Any]] = dict
    desc: str = "meta-training"
    unit: str = "it"


def begin(cfg: Config, run_dir: Path, resume: bool = False, device: torch.device | None = None) -> Session:
    """Join the torchrun process group (if any), check `resume`, create the run directory, seed, set threads.

    Args:
        resume: require `run_dir/last/` to resume from (a one-line error when there is none); without it a run
            directory that holds `last/state.json` resumes anyway.
        device: the training device (default: `cfg.train.device`).
    """
    world, device = distributed.init(device or pick_device(cfg.train.device))
    run_dir = Path(run_dir)
    resuming = check_resume(run_dir, resume)
    if resuming:
        check_resume_config(cfg, run_dir)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    set_threads(cfg)
    return Session(cfg, run_dir, world, device, resuming)


def check_resume(run_dir: Path, resume: bool) -> bool:
    """Whether `run_dir` holds a checkpoint to resume from (`last/state.json`); a task kind that reads and checks
    its data before `begin` calls this first, so that `--resume` without a checkpoint is the error it reports.

    Raises:
        FewscanError: `resume` and no checkpoint.
    """
    if Path(run_dir).is_dir():
        recover_checkpoint(Path(run_dir) / "last")
    resuming = (Path(run_dir) / "last" / "state.json").is_file()
    if resume and not resuming:
        raise FewscanError(f"{run_dir}: nothing to resume (no last/state.json)")
    return resuming


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume under a config that differs from the checkpoint's in anything but `RESUME_KEYS`: the
    restored weights, optimiser and RNG states belong to the old one (`--set train.lr=0.5` was silently accepted
    while the optimiser kept its old rate).

    Raises:
        FewscanError: naming the differing keys and both values of the first.
    """
    from pipeline.common.config import RESUME_KEYS, config_differences

    try:
        saved = json.loads((Path(run_dir) / "last" / "state.json").read_text()).get("config")
    except (OSError, ValueError) as err:
        raise FewscanError(f"{run_dir}/last/state.json: cannot read the checkpoint ({err})") from None
    if not isinstance(saved, dict):
        return  # a checkpoint written before configs were recorded in it
    now = to_dict(cfg)
    changed = [k for k in config_differences(saved, now) if k not in RESUME_KEYS]
    if changed:
        first = changed[0]
        old, new = _lookup(saved, first), _lookup(now, first)
        raise FewscanError(f"{run_dir}: cannot resume with a changed config: {', '.join(changed)} differ "
                           f"({first}: {old!r} in the checkpoint, {new!r} now); only {', '.join(RESUME_KEYS)} "
                           "may change on --resume")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def fresh_state(task: Task) -> dict[str, Any]:
    """The loop's own state at iteration 0 (saved in every checkpoint)."""
    curves: dict[str, list[float]] = {"iteration": [], **{m: [] for m in task.metrics}}
    if task.val_metric:
        curves.update({"val_iteration": [], f"val_{task.val_metric}": []})
    return {"iteration": 0, "best": None, "best_iteration": None, "bad_validations": 0, "curves": curves,
            "window": {}, "seconds": 0.0}


# --- the loop ----------------------------------------------------------------------------------------------------
def run(session: Session, task: Task, stop_at: int | None = None) -> Path:
    """Train `task` from iteration 0, or from `last/` when the session resumes; returns the run directory.

    Args:
        stop_at: stop after this iteration as if interrupted (writes `last/`, no final files; for tests and
            time-boxed runs).
    """
    cfg, world, run_dir, tr = session.cfg, session.world, session.run_dir, session.cfg.train
    last = run_dir / "last"
    state = fresh_state(task)
    rng = restore(session, task, state)
    distributed.broadcast_params(task.model, world)
    start = state["iteration"]
    stream = task.batches(start)
    if rng is not None:  # after the stream is opened: a DataLoader iterator draws its base seed from torch's RNG
        set_rng_state(rng)
    writer = None
    if world.main and tr.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
    began = time.perf_counter() - state["seconds"]
    end = tr.iterations if stop_at is None else min(stop_at, tr.iterations)
    bar = progress(range(start, end), desc=task.desc, unit=task.unit, disable=not world.main, initial=start,
                   total=tr.iterations)

    def checkpoint(done: int) -> None:
        state.update(iteration=done, seconds=time.perf_counter() - began)
        if world.main:
            save_checkpoint(last, task.model, task.optimizer,
                            {**state, "config": to_dict(cfg), **task.record},
                            extra=task.state() if task.state is not None else None)

    task.model.train()
    stopped_early = False
    for it in bar:
        for key, value in task.step(it, next(stream)).items():
            state["window"].setdefault(key, []).append(value)
        done = it + 1
        if done % tr.log_every == 0 or done == tr.iterations:
            log_window(task, state, done, bar, writer)
        if task.validate is not None and tr.val_every and (done % tr.val_every == 0 or done == tr.iterations):
            stopped_early = validation(session, task, state, done, writer)
        if done % tr.checkpoint_every == 0 or done == end or stopped_early:
            checkpoint(done)
        if stopped_early:
            break
    bar.close()
    if writer:
        writer.close()
    if world.main and (stopped_early or state["iteration"] >= tr.iterations or start >= tr.iterations):
        finish(session, task, state, stopped_early, time.perf_counter() - began)
    distributed.finish(world)
    return run_dir


def restore(session: Session, task: Task, state: dict[str, Any]) -> dict[str, Any] | None:
    """Resuming: load `last/` into the model, optimiser, task state and the loop's `state`; returns the RNG states
    to set once the stream is open. A fresh run: rank 0 saves the untrained weights; returns None."""
    last = session.run_dir / "last"
    if not session.resuming:
        if session.world.main:
            save_weights(task.model, session.run_dir / "untrained.safetensors")
        return None
    loaded = load_checkpoint(last, task.model, task.optimizer)
    if task.load_state is not None:
        task.load_state(loaded.get("extra", {}))
    state.update({k: loaded[k] for k in state})
    log.info("resuming from %s at iteration %d", last, state["iteration"])
    return loaded["rng"]


def log_window(task: Task, state: dict[str, Any], done: int, bar: Any, writer: Any) -> None:
    """Close the log window: one point per metric on the curves (and TensorBoard), then an empty window."""
    curves = state["curves"]
    summary = task.summarise(state["window"])
    curves["iteration"].append(done)
    for name in task.metrics:
        curves[name].append(summary[name])
        if writer:
            writer.add_scalar(f"train/{name}", summary[name], done)
    state["window"] = {}
    bar.set_postfix({name: f"{summary[name]:.3f}" for name in task.metrics})


def validation(session: Session, task: Task, state: dict[str, Any], done: int, writer: Any) -> bool:
    """Validate, keep `best/` on a gain; returns True when `train.patience` checks in a row brought none."""
    assert task.validate is not None
    score = task.validate()
    curves, name, patience = state["curves"], task.val_metric, session.cfg.train.patience
    curves["val_iteration"].append(done)
    curves[f"val_{name}"].append(score)
    if writer:
        writer.add_scalar(f"validation/{name}", score, done)
    if state["best"] is None or score > state["best"]:
        state.update(best=score, best_iteration=done, bad_validations=0)
        if session.world.main:
            save_checkpoint(session.run_dir / "best", task.model, task.optimizer, {**state, "iteration": done})
        return False
    state["bad_validations"] += 1
    if patience and state["bad_validations"] >= patience:
        log.info("early stop at iteration %d: no validation gain in %d checks (best %.3f at %d)",
                 done, patience, state["best"], state["best_iteration"])
        return True
    return False


def finish(session: Session, task: Task, state: dict[str, Any], stopped_early: bool, seconds: float) -> None:
    """The run's final files: `model.safetensors` (best, else last, else the current weights), `state.json`,
    `curves.json` and `learning_curve.png`."""
    run_dir = session.run_dir
    best, last = run_dir / "best" / "model.safetensors", run_dir / "last" / "model.safetensors"
    final = best if best.is_file() else last
    if final.is_file():
        with atomic_path(run_dir / "model.safetensors") as tmp:
            tmp.write_bytes(final.read_bytes())
    else:  # zero iterations: the untrained weights are the model
        save_weights(task.model, run_dir / "model.safetensors")
    write_json({"iterations": state["iteration"], "stopped_early": stopped_early, "best": state["best"],
                "best_iteration": state["best_iteration"], "seconds": seconds, "device": str(session.device),
                "processes": session.world.size,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **task.info()},
               run_dir / "state.json")
    write_json(state["curves"], run_dir / "curves.json")
    if state["curves"]["iteration"]:
        plot_curves(state["curves"], run_dir / "learning_curve.png")
