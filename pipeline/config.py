"""Run configuration: YAML files validated into dataclasses, with `--set key=value` overrides.

A config file may name a parent with `extends: other.yaml` (resolved relative to the file); keys are deep-merged.
An unknown key or a bad value raises `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from datasets.volume import FewscanError

_STRICT = ConfigDict(extra="forbid")


class ConfigError(FewscanError):
    """Invalid configuration: unknown key, bad value or unreadable file."""


@dataclass(config=_STRICT)
class DataConfig:
    """Where the collection is and which columns carry the labels."""

    source: Literal["tcia"] = "tcia"
    root: str = ""  # collection folder; relative paths resolve against the current directory
    labels: str | None = "findings.csv"  # findings CSV joined onto the series (relative to root)
    manifest: str | None = None  # an existing manifest CSV; default: index `root` into the run directory
    label_column: str = "lesion_type"
    center_columns: list[str] = Field(default_factory=lambda: ["lps_x", "lps_y", "lps_z"])
    center_frame: Literal["LPS", "RAS"] = "LPS"  # DICOM patient coordinates are LPS


@dataclass(config=_STRICT)
class SplitConfig:
    """Class holdout: `novel` classes are never seen in training; everything else is `base`."""

    novel: list[str] = Field(default_factory=list)
    validation: list[str] = Field(default_factory=list)


@dataclass(config=_STRICT)
class TransformConfig:
    """Deterministic preprocessing of each finding into a fixed-size crop."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # target voxel size, mm (RAS axes)
    window: tuple[float, float] = (-1000.0, 400.0)  # HU range mapped to [0, 1], clipped
    roi_size: tuple[int, int, int] = (24, 24, 24)  # crop around the finding centre, voxels at `spacing`
    resize: tuple[int, int, int] | None = None  # optional final resize


@dataclass(config=_STRICT)
class EpisodeConfig:
    """N-way K-shot Q-query episodes."""

    ways: int = Field(default=3, ge=2)
    shots: int = Field(default=5, ge=1)
    queries: int = Field(default=5, ge=1)
    eval_episodes: int = Field(default=200, ge=1)


@dataclass(config=_STRICT)
class ModelConfig:
    """Encoder architecture."""

    encoder: Literal["conv3d"] = "conv3d"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    norm_groups: int = Field(default=8, ge=1)  # GroupNorm: batch-independent, safe for episodic training


@dataclass(config=_STRICT)
class MethodConfig:
    """Meta-learning algorithm."""

    name: Literal["protonet"] = "protonet"
    distance: Literal["euclidean", "cosine"] = "euclidean"


@dataclass(config=_STRICT)
class TrainConfig:
    """Meta-training schedule."""

    iterations: int = Field(default=300, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    ways: int | None = Field(default=None, ge=2)  # training ways (default: episodes.ways)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = Field(default=25, ge=1)


@dataclass(config=_STRICT)
class Config:
    """A whole run: data, split, preprocessing, episodes, model, method and schedule."""

    task: Literal["classification"] = "classification"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    transforms: TransformConfig = Field(default_factory=TransformConfig)
    episodes: EpisodeConfig = Field(default_factory=EpisodeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


# Short names users type on the command line (`--set shots=1`).
ALIASES: dict[str, str] = {"shots": "episodes.shots", "ways": "episodes.ways", "queries": "episodes.queries"}

_ADAPTER = TypeAdapter(Config)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving `extends:` chains (deep merge, child wins)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return deep_merge(_read_yaml(path.parent / str(parent), (*seen, path)), raw)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `over`, merging nested mappings key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML: numbers, lists, null) to a raw mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key = ALIASES.get(key, key)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[leaf] = value
    return raw


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping into a `Config`; the first problem becomes a one-line `ConfigError`."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            raise ConfigError(f"{source}: unknown key '{key}'") from None
        raise ConfigError(f"{source}: bad value for '{key}': {first['msg']} (got {first['input']!r})") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, merge `extends`, apply `--set` overrides and validate a YAML config file."""
    raw = apply_overrides(_read_yaml(Path(path)), overrides or [])
    return validate(raw, source=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain JSON/YAML-ready mapping of a config (for the run directory)."""
    return _ADAPTER.dump_python(cfg, mode="json")
