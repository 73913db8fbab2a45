"""Preprocessing and augmentation settings (`transforms:` in a run config), validated like every config section."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid")


@dataclass(config=_STRICT)
class TransformConfig:
    """Deterministic preprocessing: each volume through `transforms.presets.volume_preset` (every task kind), then,
    for classification, each finding into a fixed-size crop."""

    preset: Literal["ct", "mr", "auto", "none"] = "ct"  # auto: by the volume's modality (CT / MR / else none)
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # target voxel size, mm (RAS axes); None: keep
    ct_window: Literal["soft_tissue", "lung", "bone", "custom"] = "custom"  # custom: `window`
    window: tuple[float, float] = (-1000.0, 400.0)  # HU range mapped to [0, 1], clipped
    mr_norm: Literal["percentile", "zscore"] = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)  # MR percentile normalisation: these map to [0, 1]
    n4: bool = False  # MR: SimpleITK N4 bias-field correction before normalising (slow: seconds per volume)
    volume_size: tuple[int, int, int] | None = None  # whole-volume presets: centre crop/pad to this size
    roi_size: tuple[int, int, int] = (24, 24, 24)  # crop around the finding centre, voxels at `spacing`
    resize: tuple[int, int, int] | None = None  # optional final resize
    slice_axis: Literal["none", "sagittal", "coronal", "axial"] = "none"  # 2D: the crop's central slice
    image_size: tuple[int, int] | None = None  # 2D sources (npz, PNG): resize every image to this (H, W)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig())


@dataclass(config=_STRICT)
class AugmentConfig:
    """Training-only augmentation, drawn per episode on the support and query tensors; evaluation never augments.

    Classification applies every key (`EpisodeAugmenter`); segmentation applies `prob`, `gamma` and `noise_std` to each
    view and refuses the others unless they are off (`augment_view`, `check_view_augment`).
    """

    enabled: bool = False
    prob: float = Field(default=0.5, ge=0.0, le=1.0)  # chance of each transform per item
    flip_axes: list[int] = Field(default_factory=list)  # spatial axes to flip at random (0 = first)
    rotate_deg: float = Field(default=10.0, ge=0.0)
    scale: float = Field(default=0.1, ge=0.0)  # relative zoom range
    translate: float = Field(default=0.0, ge=0.0)  # voxels
    noise_std: float = Field(default=0.02, ge=0.0)
    intensity_shift: float = Field(default=0.05, ge=0.0)
    intensity_scale: float = Field(default=0.1, ge=0.0)
    # random contrast (gamma) range: drawn uniformly for classification (MONAI RandAdjustContrast), log-uniformly for
    # segmentation views (transforms.augment.augment_view)
    gamma: tuple[float, float] | None = (0.8, 1.25)
    bias_field: float = Field(default=0.0, ge=0.0)  # torchio RandomBiasField coefficient (0: off)
    motion: float = Field(default=0.0, ge=0.0, le=1.0)  # probability of torchio RandomMotion (3D only)
    ghosting: float = Field(default=0.0, ge=0.0, le=1.0)  # probability of torchio RandomGhosting (3D only)


