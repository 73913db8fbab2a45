"""The run directory every task kind writes: seeding, device choice, weights, checkpoints, the resolved config.

Weights are safetensors files. A checkpoint folder (`last/`, `best/`, written by `pipeline.common.loop`) holds
`model.safetensors`, `optimizer.safetensors`, `extra.safetensors` (a task's own state, e.g. Reptile's inner
optimiser) and `state.json` (iteration, RNG states, optimiser settings, curves, config, split).
`load_run_config` reads a run's resolved `config.yaml` with `evaluate --set` items applied, and
`evaluation_files` names the episode set and report such an evaluation writes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from datasets.volume import FewscanError, InputError, atomic_path
from pipeline.common.config import Config, apply_overrides, evaluation_tag, read_yaml, to_dict, validate
from pipeline.common.report import write_json


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


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomic safetensors write of a state dict."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        InputError: naming the file: missing, or not a safetensors file (empty, a pickle, a `torch.save` archive).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing: the run (or adapted folder) is incomplete; train or adapt it again")
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError and the header parser's errors: the file is not safetensors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(path, f"not a safetensors weights file ({reason})") from None


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into `model` (strict); InputError when they are unreadable or do not fit it."""
    try:
        model.load_state_dict(read_tensors(path))
    except RuntimeError as err:
        raise InputError(path, f"weights do not fit the run's model ({str(err).splitlines()[0]})") from None
    return model


# --- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None, state: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """`folder/model.safetensors`, `optimizer.safetensors` (its tensors; none without `opt`), `extra.safetensors`
    (the tensors of `extra`, a task's own state) and `state.json` (everything else, RNG states included).

    The files are a set: they are written into a new sibling folder, which then replaces `folder` (the old one is
    moved aside first and removed last; `recover_checkpoint` puts it back if a kill falls between the two
    renames). A kill while writing leaves the previous checkpoint whole, never a model from one iteration with
    the state of another.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.new")  # mkdir, not mkdtemp: the umask's permissions
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_checkpoint(staging, model, opt, state, extra)
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_checkpoint(folder: Path) -> None:
    """Put back the previous checkpoint set when a kill fell between `save_checkpoint`'s two renames, and drop
    half-written staging folders."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (old / "state.json").is_file():
        old.rename(folder)
    shutil.rmtree(folder.with_name(f".{folder.name}.new"), ignore_errors=True)


def _write_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None, state: dict[str, Any],
                      extra: dict[str, Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors")
    record: dict[str, Any] = {**state, "rng": rng_state()}
    if opt is not None:
        opt_state = opt.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous().clone() for i, s in opt_state["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
        with atomic_path(folder / "optimizer.safetensors") as tmp:
            save_file(tensors, str(tmp))
        record["optimizer"] = {"param_groups": opt_state["param_groups"]}
    if extra is not None:
        extra_tensors: dict[str, torch.Tensor] = {}
        record["extra"] = pack(extra, extra_tensors)
        with atomic_path(folder / "extra.safetensors") as tmp:
            save_file(extra_tensors, str(tmp))
    write_json(record, folder / "state.json")


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore the weights and optimiser written by `save_checkpoint`; returns its state mapping, with `rng` (for
    `set_rng_state`, left to the caller) and the task's `extra` state unpacked."""
    try:
        state = json.loads((folder / "state.json").read_text())
        load_weights(model, folder / "model.safetensors")
        tensors = read_tensors(folder / "optimizer.safetensors") if opt is not None else {}
        if "extra" in state:
            state["extra"] = unpack(state["extra"], read_tensors(folder / "extra.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise FewscanError(f"{folder}: cannot resume from this checkpoint ({err})") from None
    if opt is not None:
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and, once initialised, CUDA) RNG states as JSON values."""
    numpy_state = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore the RNG states `rng_state` returned."""
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def pack(value: Any, tensors: dict[str, torch.Tensor], key: str = "extra") -> Any:
    """A JSON value for nested dicts/lists of tensors and JSON values; the tensors go into `tensors`.

    A tensor becomes `{"tensor": its key in tensors}`, a dict `{"dict": [[key, value], ...]}` (so int keys, as
    in an optimiser's state, come back as ints), a tuple a list.
    """
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, pack(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [pack(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `pack` (tuples come back as lists)."""
    if isinstance(value, dict):
        return tensors[value["tensor"]] if "tensor" in value else {k: unpack(v, tensors) for k, v in value["dict"]}
    if isinstance(value, list):
        return [unpack(v, tensors) for v in value]
    return value


def write_config(cfg: Config, run_dir: Path) -> None:
    """The resolved config as `run_dir/config.yaml` (what `load_run_config` reads back)."""
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was trained with, with `evaluate --set` items (checked by `evaluation_tag` against
    the run's task kind)."""
    raw = read_yaml(run_dir / "config.yaml")
    evaluation_tag(overrides or [], raw.get("task", "classification"))
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=str(run_dir / "config.yaml"))


def evaluation_files(run_dir: Path, overrides: list[str] | None, out: Path | None,
                     task: str) -> tuple[Path, Path, str]:
    """Where an evaluation keeps its episode set and report, and the suffix of its plots' names.

    Without episode-changing overrides: `RUN/episodes.json`, `RUN/report.json` (or `out`), no suffix. With them,
    e.g. `--set shots=5`: `RUN/episodes_shots5.json`, `RUN/report_shots5.json` (or `out`), plots `*_shots5.png`,
    so the run's own evaluation is neither reused nor overwritten. `task` is the run's task kind (`EVAL_KEYS`).
    """
    tag = evaluation_tag(overrides or [], task)
    suffix = f"_{tag}" if tag else ""
    return run_dir / f"episodes{suffix}.json", Path(out or run_dir / f"report{suffix}.json"), suffix


def read_split(run_dir: Path) -> dict[str, Any]:
    """The class (and patient) split written at training time.

    Raises:
        InputError: naming `split.json`: missing, not JSON, or not a mapping of lists.
    """
    path = Path(run_dir) / "split.json"
    try:
        split = json.loads(path.read_text())
    except OSError as err:
        raise InputError(path, f"cannot read the run's split ({err.strerror}); the run is incomplete") from None
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k, []), list) for k in ("base", "novel")):
        raise InputError(path, "not a split (a mapping such as base/validation/novel -> lists of names)")
    return split


def set_threads(cfg: Config) -> None:
    """Apply `train.threads` to torch and SimpleITK (the classical baselines get the same CPU budget); 0 keeps both
    libraries' defaults.

    Small 2D nets on a CPU shared with other jobs ran ~10x faster on 1 thread than on 2 (thread spin-waiting,
    benchmarks/README.md).
    """
    if cfg.train.threads:
        import SimpleITK as sitk

        torch.set_num_threads(cfg.train.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.train.threads)


def discard_failed_run(run_dir: Path, fresh: bool) -> None:
    """Remove the run folder a refused `train` created (`fresh`: it did not exist before), unless it already holds
    a checkpoint to resume from: a failed run leaves nothing behind, an interrupted one keeps its progress."""
    if fresh and Path(run_dir).is_dir() and not (Path(run_dir) / "last").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def check_run_weights(run_dir: Path) -> None:
    """Parse the headers of the run's trained and untrained weights (no tensor is read) before an evaluation
    writes anything, its episode set first of all, so a damaged weights file is refused up front.

    Raises:
        InputError: naming the file: missing, or not a safetensors file.
    """
    from safetensors import safe_open

    for path in (Path(run_dir) / "model.safetensors", Path(run_dir) / "untrained.safetensors"):
        if not path.is_file():
            raise InputError(path, "missing: the run is incomplete; train it again")
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError and the header parser's errors
            raise InputError(path, f"not a safetensors weights file ({str(err).strip().splitlines()[0]})") from None
