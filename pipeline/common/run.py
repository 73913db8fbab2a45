"""The run directory every task kind writes: seeding, device choice, weights, checkpoints, the resolved config.

Weights are safetensors files. A checkpoint folder (`last/`, `best/`) holds `model.safetensors`,
`optimizer.safetensors` and `state.json` (iteration, RNG states, optimiser settings, curves, config, split).
`load_run_config` reads a run's resolved `config.yaml` with `evaluate --set` items applied, and
`evaluation_files` names the episode set and report such an evaluation writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from datasets.volume import FewscanError, atomic_path
from pipeline.common.config import Config, apply_overrides, evaluation_tag, validate
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


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into `model` (strict)."""
    model.load_state_dict(load_file(str(path)))
    return model


# --- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`folder/model.safetensors`, `optimizer.safetensors` (tensors) and `state.json` (everything else)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors")
    opt_state = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous().clone() for i, s in opt_state["state"].items()
               for k, v in s.items() if torch.is_tensor(v)}
    with atomic_path(folder / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().tolist()}
    rng["numpy"] = [rng["numpy"][0], rng["numpy"][1].tolist(), *rng["numpy"][2:]]
    write_json({**state, "rng": rng, "optimizer": {"param_groups": opt_state["param_groups"]}},
               folder / "state.json")


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimiser and RNG states written by `save_checkpoint`; returns its state mapping."""
    try:
        state = json.loads((folder / "state.json").read_text())
        load_weights(model, folder / "model.safetensors")
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as err:
        raise FewscanError(f"{folder}: cannot resume from this checkpoint ({err})") from None
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    rng = state["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    return state


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was trained with, with `evaluate --set` items (checked by `evaluation_tag` against
    the run's task kind)."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
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
    """The class (and patient) split written at training time."""
    return json.loads((run_dir / "split.json").read_text())


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

