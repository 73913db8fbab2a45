"""Run configuration: YAML files validated into dataclasses, with `--set key=value` overrides.

A config file may name a parent with `extends: other.yaml` (resolved relative to the file); keys are deep-merged.
An unknown key or a bad value raises `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from datasets.volume import FewscanError
from transforms.config import TransformConfig

_STRICT = ConfigDict(extra="forbid")


class ConfigError(FewscanError):
    """Invalid configuration: unknown key, bad value or unreadable file."""


@dataclass(config=_STRICT)
class DataConfig:
    """Where the collection is and which columns carry the labels."""

    source: Literal["tcia", "decathlon", "npz", "folder"] = "tcia"
    root: str = ""  # collection folder (npz: the .npz file); relative paths resolve against the current directory
    labels: str | None = "findings.csv"  # findings CSV joined onto the series (relative to root)
    manifest: str | None = None  # an existing manifest CSV; default: index `root` into the run directory
    label_column: str = "lesion_type"
    center_columns: list[str] = Field(default_factory=lambda: ["lps_x", "lps_y", "lps_z"])
    center_frame: Literal["LPS", "RAS"] = "LPS"  # DICOM patient coordinates are LPS
    npz_parts: list[str] | None = None  # npz with MedMNIST keys: parts to pool (default all of train/val/test)
    structures: list[str] | None = None  # decathlon: structure names to crop around (default all named labels)
    min_voxels: int = Field(default=1, ge=1)  # decathlon: a structure smaller than this in a case is skipped


@dataclass(config=_STRICT)
class SplitConfig:
    """Class holdout: `novel` classes are never seen in training; everything else is `base`."""

    novel: list[str] = Field(default_factory=list)
    validation: list[str] = Field(default_factory=list)
    patients: PatientSplitConfig = Field(default_factory=lambda: PatientSplitConfig())


@dataclass(config=_STRICT)
class PatientSplitConfig:
    """Patient-level split (by group key, seeded): base classes train on `train` patients, validation classes use
    `validation` patients, novel classes are evaluated on `test` patients. All zero: no patient split."""

    validation: float = Field(default=0.0, ge=0.0, lt=1.0)
    test: float = Field(default=0.0, ge=0.0, lt=1.0)






@dataclass(config=_STRICT)
class EpisodeConfig:
    """N-way K-shot Q-query episodes."""

    ways: int = Field(default=3, ge=2)
    shots: int = Field(default=5, ge=1)
    queries: int = Field(default=5, ge=1)
    eval_episodes: int = Field(default=200, ge=1)
    workers: int = Field(default=0, ge=0)  # DataLoader worker processes assembling training episodes
    prefetch: int = Field(default=2, ge=1)  # episodes each worker prepares ahead


@dataclass(config=_STRICT)
class ModelConfig:
    """Encoder architecture."""

    encoder: Literal["conv3d", "conv4_2d", "conv4_3d", "resnet10_2d", "resnet18_2d", "resnet10_3d",
                     "resnet18_3d"] = "conv3d"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])  # conv3d blocks
    filters: int = Field(default=64, ge=1)  # conv4_*: width of each of the 4 blocks
    norm: Literal["group", "batch", "instance"] = "group"  # batch = batch statistics always (no running stats)
    norm_groups: int = Field(default=8, ge=1)  # GroupNorm: batch-independent, safe for episodic training
    pool_size: int = Field(default=1, ge=1)  # conv encoders: final average-pooling grid (1 = global pooling)
    in_channels: int = Field(default=1, ge=1)  # set from the data at training time


@dataclass(config=_STRICT)
class MethodConfig:
    """Meta-learning algorithm."""

    name: Literal["protonet", "matching", "siamese", "maml", "metasgd", "reptile", "finetune"] = "protonet"
    distance: Literal["euclidean", "cosine"] = "euclidean"  # protonet
    # protonet: scale multiplying the logits; a number fixes it, `learn` meta-learns it (saved with the weights,
    # starting from the default); null: the default, 10 on the unit sphere (cosine), 5 for Euclidean on normalised
    # embeddings (the same softmax), 1 for plain Euclidean
    temperature: Annotated[float, Field(gt=0)] | Literal["learn"] | None = None
    normalize: bool = False  # protonet: L2-normalise embeddings before prototypes and distances (Meta-Baseline)
    inner_steps: int = Field(default=5, ge=0)  # maml / metasgd / reptile: inner steps in meta-training
    inner_lr: float = Field(default=0.4, gt=0)  # inner step size (metasgd: initial value of the learned ones)
    eval_inner_steps: int | None = Field(default=None, ge=0)  # at evaluation/adapt (default: inner_steps)
    first_order: bool = False  # maml / metasgd: drop second-order terms (memory flat in inner_steps)
    per_step_lr: bool = False  # maml: learn a step size per inner step and parameter tensor (MAML++), from inner_lr
    multi_step_loss: bool = False  # maml / metasgd: query loss after every inner step, annealed to the last (MAML++)
    msl_iterations: int = Field(default=100, ge=1)  # multi_step_loss: meta-iterations until the last step alone counts
    adapt: Literal["all", "head"] = "all"  # maml / metasgd: inner loop adapts every parameter, or the head (ANIL)
    meta_batch: int = Field(default=1, ge=1)  # tasks per optimiser step
    vmap: bool = False  # maml / metasgd: vectorise the tasks of a meta-batch with torch.func.vmap
    # maml / metasgd on CPU: tasks of a meta-batch in parallel threads; 0: one per core this process may use
    task_threads: int = Field(default=1, ge=0)
    margin: float = Field(default=1.0, gt=0)  # siamese: contrastive margin on unit-normalised embeddings
    head_steps: int = Field(default=100, ge=1)  # finetune: Adam steps fitting the new head on the support
    head_lr: float = Field(default=0.01, gt=0)  # finetune: the new head's learning rate


@dataclass(config=_STRICT)
class TrainConfig:
    """Meta-training schedule."""

    iterations: int = Field(default=300, ge=0)
    lr: float = Field(default=1e-3, ge=0)  # 0: a control run whose weights stay the untrained ones
    weight_decay: float = Field(default=0.0, ge=0)
    ways: int | None = Field(default=None, ge=2)  # training ways (default: episodes.ways)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = Field(default=25, ge=1)
    val_every: int = Field(default=50, ge=0)  # validate on the validation classes every N iterations (0: never)
    val_episodes: int = Field(default=50, ge=1)  # fixed validation episodes
    patience: int | None = Field(default=None, ge=1)  # early stop after this many validations without gain
    checkpoint_every: int = Field(default=50, ge=1)  # write RUN_DIR/last every N iterations
    tensorboard: bool = True  # scalars into RUN_DIR/tensorboard
    threads: int = Field(default=0, ge=0)  # torch and SimpleITK CPU threads for train/evaluate; 0: their defaults
    # classification: the first N iterations train the encoder + a base-class linear head on plain batches
    # (Meta-Baseline's pre-training), the rest are episodic
    pretrain_iterations: int = Field(default=0, ge=0)
    pretrain_batch: int = Field(default=64, ge=2)


@dataclass(config=_STRICT)
class SegmentationConfig:
    """Few-shot segmentation (`task: segmentation`): episodes, prototype network, baselines (pipeline/segmentation/).

    Cases are preprocessed by `transforms` (preset, spacing, CT window / MR percentiles) and training views
    augmented by `transforms.augment` (gamma and noise only, see `transforms.augment.augment_view`).
    """

    mode: Literal["2d", "3d"] = "2d"  # 2d: axial slices, SSL-ALPNet protocol; 3d: volumes / crops
    supervision: Literal["self", "labels"] = "self"  # self: supervoxel pseudo-structures; labels: training organs
    # propagate: register each support to the query (the `registration` section's network, trained on images only)
    method: Literal["proto", "maml", "propagate"] = "proto"
    fusion: Literal["local", "mean"] = "local"  # propagate, K > 1: locally weighted voting, or the plain mean
    held_out: list[str] = Field(default_factory=list)  # evaluated, never trained on; empty: every labelled one
    test_patients: float = Field(default=0.3, ge=0, lt=1)  # share of patients kept out of training (0: none)
    setting: Literal[1, 2] = 1  # 2: training slices/crops that contain a held-out structure are dropped
    crop: tuple[int, int, int] = (32, 32, 32)  # 3d training crops and sliding-window size
    encoder: Literal["unet", "basicunet", "segresnet"] = "unet"  # monai.networks.nets backbone
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    features: int = Field(default=32, ge=2)
    local_pool: int = Field(default=4, ge=1)  # adaptive local prototypes: pooling window, feature voxels
    local_threshold: float = Field(default=0.95, gt=0, le=1)  # share of a window inside the mask to keep it
    local_max: int = Field(default=256, ge=1)  # at most this many local windows per item (pool grows to fit)
    scale: float = Field(default=20.0, gt=0)  # cosine-similarity temperature (PANet)
    score_stride: int = Field(default=1, ge=1)  # prediction: score prototypes on a grid this much coarser, upsample
    supervoxels: Literal["slic", "felzenszwalb"] = "slic"
    n_supervoxels: int = Field(default=60, ge=2)
    chunks: int = Field(default=3, ge=1)  # 2d evaluation: support/query slice chunks (SSL-ALPNet)
    inner_steps: int = Field(default=3, ge=1)  # maml and finetune: steps on the support
    inner_lr: float = Field(default=0.2, gt=0)  # maml SGD step: 0.01 left the meta-init all background
    first_order: bool = True
    finetune_steps: int = Field(default=20, ge=0)
    baselines: list[Literal["atlas", "finetune"]] = Field(default_factory=lambda: ["finetune"])
    overlays: int = Field(default=4, ge=0)  # overlay PNGs written by evaluate
    codes: dict[str, str] = Field(default_factory=dict)  # DICOM-SEG: structure name -> SCHEME:VALUE:MEANING


@dataclass(config=_STRICT)
class RegistrationConfig:
    """Few-shot deformable registration (`task: registration`): pairs, network, losses, meta-learning.

    Pairs come from `data.root` (a Decathlon folder) and `extra_roots` (more anatomies/modalities for
    meta-training only); preprocessing is `transforms` (set `volume_size` so every volume shares one grid).
    """

    pairing: Literal["inter", "intra"] = "inter"  # moving and fixed from different patients, or the same one
    patient_regex: str | None = None  # first group of this regex on the case id = the patient; None: one per case
    image_channels: list[int] | None = None  # multi-channel images: channels used (one task each); None: all
    extra_roots: list[str] = Field(default_factory=list)  # more Decathlon folders: meta-training tasks only
    test_patients: float = Field(default=0.3, gt=0, lt=1)  # share of data.root patients held out of training
    adapt_patients: int = Field(default=3, ge=0)  # held-out patients whose pairs adapt to the new task
    train_pairs: int = Field(default=400, ge=1)  # fixed pool of training pairs
    pairs_per_task: int = Field(default=4, ge=1)  # pairs sharing one fixed image: one meta-training task
    eval_pairs: int = Field(default=20, ge=1)
    adapt_pairs: int = Field(default=6, ge=0)
    prealign: Literal["none", "globalnet", "sitk"] = "globalnet"  # affine stage before the deformable network
    network: Literal["localnet", "regunet", "voxelmorph"] = "localnet"  # monai.networks.nets
    features: int = Field(default=16, ge=2)  # channels of the first level (>= 16 keeps CPU convs on oneDNN)
    levels: int = Field(default=3, ge=2)  # resolution levels (volume_size divisible by 2**levels with half_res)
    half_res: bool = True  # network sees 2x-downsampled images, its field is upsampled (8x less compute)
    diffeomorphic: bool = False  # network outputs a velocity field, integrated by DVF2DDF
    integration_steps: int = Field(default=7, ge=1)
    similarity: Literal["lncc", "mi"] = "lncc"  # local normalised cross-correlation, or global mutual information
    lncc_kernel: int = Field(default=7, ge=3)
    regulariser: Literal["bending", "diffusion"] = "bending"
    reg_weight: float = Field(default=1.0, ge=0)
    dice_weight: float = Field(default=1.0, ge=0)  # weak supervision by warped labels when pairs have them
    meta: Literal["reptile", "joint"] = "reptile"  # joint: plain training on all pairs (the ablation)
    inner_steps: int = Field(default=3, ge=1)  # Reptile: Adam steps on one task before the meta-update
    meta_lr: float = Field(default=0.5, gt=0, le=1)  # Reptile outer step towards the adapted weights
    adapt_steps: int = Field(default=20, ge=0)  # test time: steps on the new task's adaptation pairs
    adapt_lr: float = Field(default=1e-4, gt=0)
    instance_steps: int = Field(default=0, ge=0)  # test time: Adam steps on each pair's own field (no labels)
    instance_lr: float = Field(default=0.2, gt=0)  # voxels of the residual field per step
    # coarse to fine: a residual field at 1/s resolution per entry ([2]: half resolution only); `instance_steps`
    # steps at the last (finest) scale, `instance_coarse_steps` (None: as many) at each one before it
    instance_scales: list[PositiveInt] = Field(default_factory=lambda: [2], min_length=1)
    instance_coarse_steps: int | None = Field(default=None, ge=0)
    instance_reg_weight: float | None = Field(default=None, ge=0)  # the regulariser's weight then (None: reg_weight)
    baseline: Literal["affine+demons", "affine+bspline", "none"] = "affine+demons"  # SimpleITK, same pairs
    baseline_affine: bool = True  # also report SimpleITK affine alone

    def size_divisor(self) -> int:
        """What every side of the network's grid must be a multiple of: the networks halve the grid `levels - 1`
        times, after the 2x average pooling of `half_res`."""
        return 2 ** (self.levels - 1) * (2 if self.half_res else 1)

    def grid_problem(self, size: Sequence[int]) -> str | None:
        """Why a volume of `size` voxels cannot be the network's grid, and the fix; None when it can be."""
        d = self.size_divisor()
        if all(s >= d and s % d == 0 for s in size):
            return None
        halvings = self.levels - 1 + int(self.half_res)
        fit = [max(d, round(s / d) * d) for s in size]
        return (f"{list(size)} is not a positive multiple of {d} on every side (the registration network halves the "
                f"grid {halvings} times: registration.levels={self.levels}, "
                f"half_res={str(self.half_res).lower()}); set transforms.volume_size to multiples of {d}, "
                f"e.g. {fit}, or lower registration.levels")


@dataclass(config=_STRICT)
class Config:
    """A whole run: data, split, preprocessing, episodes, model, method and schedule."""

    task: Literal["classification", "segmentation", "registration"] = "classification"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    transforms: TransformConfig = Field(default_factory=TransformConfig)
    episodes: EpisodeConfig = Field(default_factory=EpisodeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)


# Short names users type on the command line (`--set shots=1`).
ALIASES: dict[str, str] = {"shots": "episodes.shots", "ways": "episodes.ways", "queries": "episodes.queries"}

_ADAPTER = TypeAdapter(Config)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
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
    return deep_merge(read_yaml(path.parent / str(parent), (*seen, path)), raw)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `over`, merging nested mappings key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# What `evaluate --set` may change, per task kind: how a run is evaluated, never what was trained (model, method,
# data, split). Classification and segmentation draw other fixed episodes; registration evaluates the pairs fixed
# at training and may change only its test-time adaptation.
_EPISODE_KEYS = ("episodes.shots", "episodes.queries", "episodes.eval_episodes", "seed")  # segmentation has no ways
_INSTANCE_KEYS = ("registration.instance_steps", "registration.instance_lr", "registration.instance_scales",
                  "registration.instance_coarse_steps", "registration.instance_reg_weight")
EVAL_KEYS: dict[str, tuple[str, ...]] = {
    "classification": (*_EPISODE_KEYS, "episodes.ways"),
    "segmentation": (*_EPISODE_KEYS, "segmentation.fusion", "segmentation.score_stride",
                     *_INSTANCE_KEYS),  # propagate's test-time optimisation
    "registration": (*_INSTANCE_KEYS, "registration.adapt_steps", "registration.adapt_lr"),
}
EVAL_RUNTIME_KEYS = ("train.device", "train.threads")  # change no number, so no separate report
# What `train --resume` may change: where and how fast it runs, how often it logs, and how long it goes on.
RESUME_KEYS = (*EVAL_RUNTIME_KEYS, "train.iterations", "train.log_every", "train.checkpoint_every",
               "train.tensorboard", "episodes.workers", "episodes.prefetch")


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings (`to_dict`), nested keys spelled out."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{name}.")
        elif a != b:
            keys.append(name)
    return keys


def evaluation_tag(overrides: list[str], task: str) -> str:
    """Check `evaluate --set` items against `EVAL_KEYS[task]`; return the tag of the files such an evaluation writes.

    The tag (e.g. `shots5_queries10` or `instance_steps5`, empty when only runtime keys change) names the episode
    set and report written beside the run's own, so one trained run can be scored at several K.

    Raises:
        ConfigError: a key outside `EVAL_KEYS[task]` + `EVAL_RUNTIME_KEYS`, or an item without `=`.
    """
    allowed = EVAL_KEYS[task] + EVAL_RUNTIME_KEYS
    tag = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key = ALIASES.get(key, key)
        if key not in allowed:
            raise ConfigError(f"evaluate --set {key}: only {', '.join(allowed)} can change after training a {task} "
                              "run (the weights belong to the rest of the run's config)")
        if key in EVAL_KEYS[task]:
            tag.append(f"{key.rsplit('.', 1)[-1].replace('eval_', '')}{text.strip()}")
    return "_".join(tag)


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
    """Validate a raw mapping into a `Config` (each section, then the rules across sections); the first problem
    becomes a one-line `ConfigError`."""
    try:
        cfg = _ADAPTER.validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            raise ConfigError(f"{source}: unknown key '{key}'") from None
        raise ConfigError(f"{source}: bad value for '{key}': {first['msg']} (got {first['input']!r})") from None
    _check_sections(cfg, source)
    return cfg


def _check_sections(cfg: Config, source: str) -> None:
    """Rules across sections, which no single section's validation sees: a registration run's fixed grid
    (`transforms.volume_size`) must suit its network (`registration.levels`, `half_res`). Checked here so that
    `train` refuses before it writes anything, rather than when it builds the network."""
    size = cfg.transforms.volume_size
    if cfg.task == "registration" and size is not None:
        problem = cfg.registration.grid_problem(size)
        if problem is not None:
            raise ConfigError(f"{source}: transforms.volume_size {problem}")
    _check_method(cfg.method, source)


def _check_method(m: MethodConfig, source: str) -> None:
    """A method option set away from its default for a method that would ignore it is an error, not a no-op."""
    rules = [  # (key, set, the methods that use it)
        ("per_step_lr", m.per_step_lr, ("maml",)),  # metasgd learns per-element step sizes already
        ("multi_step_loss", m.multi_step_loss, ("maml", "metasgd")),
        ("adapt", m.adapt != "all", ("maml", "metasgd")),
        ("temperature", m.temperature is not None, ("protonet",)),
        ("normalize", m.normalize, ("protonet",)),
    ]
    for key, used, methods in rules:
        if used and m.name not in methods:
            raise ConfigError(f"{source}: method.{key} applies to method.name {' or '.join(methods)}, not {m.name}; "
                              "remove it or change the method")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, merge `extends`, apply `--set` overrides and validate a YAML config file."""
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    return validate(raw, source=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain JSON/YAML-ready mapping of a config (for the run directory)."""
    return _ADAPTER.dump_python(cfg, mode="json")
