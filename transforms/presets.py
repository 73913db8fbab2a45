"""MONAI dictionary-transform presets built from config.

The deterministic part (orientation, spacing, intensity) runs once per volume in a command, and callers keep the
prepared volume in memory; crops around each finding or structure are then cut from it, so a series is resampled
only once per command.
Random augmentation lives in `transforms/augment.py` and is applied per training episode only.

Presets work on `{"image": MetaTensor, "label": MetaTensor}` dicts (label optional): images are resampled
linearly, labels nearest-neighbour, both to RAS at the configured spacing.
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
    Lambdad,
    NormalizeIntensityd,
    Orientationd,
    Resize,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from datasets.volume import Volume
from transforms.config import TransformConfig
from transforms.crop import crop_at

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

# Standard radiology windows as (low, high) HU: soft tissue W400/L40, lung W1500/L-600, bone W1800/L400.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
}
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # array axes after RAS orientation


def volume_to_dict(volume: Volume, label: Volume | None = None,
                   dtype: torch.dtype = torch.float32) -> dict[str, MetaTensor]:
    """Wrap a `Volume` (array `(I, J, K)` or `(I, J, K, C)`, RAS affine) as MONAI's `{"image": MetaTensor}`,
    plus `"label"` when a label map is given (same grid expected).

    Args:
        dtype: of the image tensor: the precision the preset computes in.
    """
    out = {"image": _meta_tensor(volume, dtype)}
    if label is not None:
        out["label"] = _meta_tensor(label, torch.float32)
    return out


def _meta_tensor(volume: Volume, dtype: torch.dtype) -> MetaTensor:
    # 4D volumes (multi-channel MR, Decathlon) keep their channels last; 3D have none. Both must be given at
    # construction: MONAI 1.6 otherwise caches 2 spatial dims for a channel-less 3D array, and later pads/crops
    # then leave the affine's third axis unshifted (crops off-centre along K).
    channel = -1 if volume.array.ndim == 4 else "no_channel"
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(volume.array), dtype=dtype),
                      affine=torch.as_tensor(volume.affine, dtype=torch.float64),
                      meta={"original_channel_dim": channel}, spatial_ndim=3)


def preset_kind(cfg: TransformConfig, modality: str | None) -> str:
    """`ct`, `mr` or `none`: the configured preset, or with `auto` the one matching the modality."""
    if cfg.preset != "auto":
        return cfg.preset
    mod = (modality or "").upper()
    return "ct" if mod.startswith("CT") else "mr" if mod.startswith("MR") else "none"


def ct_window(cfg: TransformConfig) -> tuple[float, float]:
    """The HU range mapped to [0, 1]."""
    return tuple(cfg.window) if cfg.ct_window == "custom" else CT_WINDOWS[cfg.ct_window]


def volume_preset(cfg: TransformConfig, modality: str | None = None) -> Compose:
    """Deterministic whole-volume preset on `{"image", "label"?}` dicts.

    Channel first, RAS orientation, target spacing (image linear, label nearest), optional N4 (MR), intensity
    (CT: HU window to [0, 1], clipped; MR: percentiles to [0, 1] or z-score over non-zero voxels), and an
    optional centre crop/pad to `volume_size`.

    Args:
        cfg: transform section of the run config.
        modality: DICOM-style modality of the volume (`CT`, `MR`...), used when `cfg.preset` is `auto`.

    Returns:
        A `Compose` mapping image `(I, J, K)` / `(I, J, K, C)` to `(C, I', J', K')` MetaTensors with affines.
    """
    keys = ["image", "label"]
    steps: list = [
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        # Explicit RAS labels: our affines are RAS+ (Volume convention), never the DICOM LPS frame.
        Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=True),
    ]
    if cfg.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=cfg.spacing, mode=("bilinear", "nearest"),
                              padding_mode=("border", "zeros"), allow_missing_keys=True))
    kind = preset_kind(cfg, modality)
    if kind == "ct":
        low, high = ct_window(cfg)
        steps.append(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif kind == "mr":
        if cfg.n4:
            steps.append(Lambdad(keys="image", func=n4_correct))
        if cfg.mr_norm == "percentile":
            lo, hi = cfg.percentiles
            steps.append(ScaleIntensityRangePercentilesd(keys="image", lower=lo, upper=hi, b_min=0.0, b_max=1.0,
                                                         clip=True, channel_wise=True))
        else:
            steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if cfg.volume_size is not None:
        steps.append(ResizeWithPadOrCropd(keys=keys, spatial_size=cfg.volume_size, allow_missing_keys=True))
    return Compose(steps)


def prepare(cfg: TransformConfig, modality: str | None = None) -> Compose:
    """The classification path's per-volume preset: `volume_preset` on `{"image"}` (see there)."""
    return volume_preset(cfg, modality)


def n4_correct(image: torch.Tensor, shrink: int = 2, iterations: int = 20) -> torch.Tensor:
    """SimpleITK N4 bias-field correction of each channel of `(C, I, J, K)`; same shape, metadata kept.

    The field is fitted on a `shrink`-times downsampled copy (Otsu mask) and applied at full resolution.
    """
    import SimpleITK as sitk

    out = image.clone()
    spacing = [float(s) for s in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)] \
        if isinstance(image, MetaTensor) else [1.0, 1.0, 1.0]
    for c in range(image.shape[0]):
        arr = np.asarray(image[c].detach().cpu().numpy(), dtype=np.float32)
        offset = float(arr.min())
        # sitk arrays are (z, y, x): transpose so sitk's x is our first axis.
        itk = sitk.GetImageFromArray((arr - offset + 1.0).transpose(2, 1, 0))
        itk.SetSpacing(spacing)
        small = sitk.Shrink(itk, [shrink] * 3)
        mask = sitk.OtsuThreshold(small, 0, 1, 200)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations([iterations] * 3)
        n4.Execute(small, mask)
        log_field = n4.GetLogBiasFieldAsImage(itk)
        corrected = sitk.GetArrayFromImage(itk / sitk.Exp(log_field)).transpose(2, 1, 0)
        out[c] = torch.as_tensor(corrected + offset - 1.0, dtype=out.dtype)
    return out


def world_to_voxel(image: MetaTensor, point_ras: Sequence[float]) -> np.ndarray:
    """Continuous voxel index `(3,)` of a RAS world point in a MetaTensor with affine."""
    affine = np.asarray(image.affine, dtype=float)
    return (np.linalg.inv(affine) @ np.append(np.asarray(point_ras, float), 1.0))[:3]


def crop_around(image: MetaTensor, point_ras: Sequence[float], cfg: TransformConfig) -> torch.Tensor:
    """Fixed-size crop centred on a world point (a lesion or structure centre), zero-padded outside the volume.

    Args:
        image: prepared volume `(C, I, J, K)` with affine.
        point_ras: centre in RAS millimetres.

    Returns:
        Crop of shape `(C, *roi_size)` (or `(C, *resize)`); with `slice_axis` set, its central 2D slice
        `(C, H, W)` along that axis.
    """
    roi = np.asarray(cfg.roi_size)
    # Pad by half a crop on every side first, and read the centre off the padded affine: the crop then never needs
    # more padding, and the rounding of the centre is the one the crops were always cut with.
    padded = BorderPad(spatial_border=[int(r) // 2 + 1 for r in roi], mode="constant", value=0.0)(image)
    centre = np.round(world_to_voxel(padded, point_ras)).astype(int)
    start = centre - roi // 2
    if np.any(start < 0) or np.any(start + roi > np.asarray(padded.shape[1:])):
        raise ValueError(f"centre {list(point_ras)} lies outside the volume")
    crop = crop_at(padded, centre, roi)
    if cfg.resize is not None:
        crop = Resize(spatial_size=cfg.resize, mode="trilinear")(crop)
    crop = torch.as_tensor(crop).float()
    if cfg.slice_axis != "none":
        crop = central_slice(crop, SLICE_AXES[cfg.slice_axis])
    return crop


def central_slice(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """The middle 2D slice `(C, ...)` of `(C, I, J, K)` along spatial `axis` (0, 1 or 2)."""
    return volume.select(axis + 1, volume.shape[axis + 1] // 2).contiguous()


def extract_slices(volume: torch.Tensor, axis: int, indices: Sequence[int] | None = None) -> torch.Tensor:
    """2D slices of `(C, I, J, K)` along spatial `axis` as a batch `(n, C, ...)` (all slices when None)."""
    idx = range(volume.shape[axis + 1]) if indices is None else indices
    return torch.stack([volume.select(axis + 1, int(i)) for i in idx])


def image_2d(array: np.ndarray, size: Sequence[int] | None = None) -> torch.Tensor:
    """A 2D image `(C, H, W)` (or a batch `(M, C, H, W)`) to float32 in [0, 1], optionally resized.

    Integer images are divided by their dtype's maximum (so contrast between images is kept); float images
    are used as they are.
    """
    arr = np.asarray(array)
    scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "iu" else 1.0
    x = torch.as_tensor(arr.astype(np.float32) / np.float32(scale))
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        batch = x if x.ndim == 4 else x[None]
        batch = torch.nn.functional.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False,
                                                antialias=True)
        x = batch if x.ndim == 4 else batch[0]
    return x
