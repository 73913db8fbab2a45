"""MONAI dictionary-transform presets built from config.

The deterministic part (orientation, spacing, intensity window) runs once per volume; crops around each
finding are then cut from the prepared volume, so a series with several findings is resampled only once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    Compose,
    EnsureChannelFirstd,
    Orientationd,
    Resize,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
)

from datasets.volume import Volume
from pipeline.config import TransformConfig

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def volume_to_dict(volume: Volume) -> dict[str, MetaTensor]:
    """Wrap a `Volume` (array `(I, J, K)`, RAS affine) as MONAI's `{"image": MetaTensor}` with its affine."""
    image = MetaTensor(torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32),
                       affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    image.meta["original_channel_dim"] = "no_channel"
    return {"image": image}


def prepare(cfg: TransformConfig) -> Compose:
    """Deterministic per-volume preset: channel first, RAS orientation, target spacing, HU window to [0, 1]."""
    low, high = cfg.window
    return Compose([
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=cfg.spacing, mode="bilinear", padding_mode="border"),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ])


def world_to_voxel(image: MetaTensor, point_ras: Sequence[float]) -> np.ndarray:
    """Continuous voxel index `(3,)` of a RAS world point in a MetaTensor with affine."""
    affine = np.asarray(image.affine, dtype=float)
    return (np.linalg.inv(affine) @ np.append(np.asarray(point_ras, float), 1.0))[:3]


def crop_around(image: MetaTensor, point_ras: Sequence[float], cfg: TransformConfig) -> torch.Tensor:
    """Fixed-size crop centred on a world point, padded with 0 (the window's floor) where it leaves the volume.

    Args:
        image: prepared volume `(1, I, J, K)` with affine.
        point_ras: centre in RAS millimetres.

    Returns:
        Crop of shape `(1, *roi_size)`, or `(1, *resize)` when resizing is configured.
    """
    roi = np.asarray(cfg.roi_size)
    # Pad by half a crop on every side first, so the crop stays centred on the point at the borders.
    padded = BorderPad(spatial_border=[int(r) // 2 + 1 for r in roi], mode="constant", value=0.0)(image)
    centre = np.round(world_to_voxel(padded, point_ras)).astype(int)
    crop = SpatialCrop(roi_center=centre.tolist(), roi_size=roi.tolist())(padded)
    if tuple(crop.shape[1:]) != tuple(roi):
        raise ValueError(f"finding centre {list(point_ras)} lies outside the volume")
    if cfg.resize is not None:
        crop = Resize(spatial_size=cfg.resize, mode="trilinear")(crop)
    return torch.as_tensor(crop).float()


def lps_to_ras(point: Sequence[float]) -> np.ndarray:
    """DICOM patient coordinates (LPS) to RAS: negate x and y."""
    return LPS_TO_RAS @ np.asarray(point, dtype=float)
