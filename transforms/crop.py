"""Crops and pads, in one place, on MONAI's crop/pad rules and transforms.

- `crop_at`: a fixed-size crop centred on a voxel, zero outside the image (segmentation views and fine-tuning
  batches; the crop around a finding, `transforms.presets.crop_around`).
- `pad_divisible`: a batch zero-padded to multiples of a backbone's down-sampling factor, with the slices that undo
  it.
- `fit_size`: centre crop and/or zero pad to a size (whole-volume items without a centre).

Arrays and plain tensors take MONAI's slice and pad rules (`Crop.compute_slices`, `DivisiblePad.compute_pad_width`)
and its pad backend (`pad_nd`) directly: the transform objects wrap every input in a MetaTensor and record the
operation, which costs 40-70x the crop itself (1-3 ms a view on this machine) on the per-view training path.
MetaTensors go through the transforms, which also move their affine to the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, Crop, DivisiblePad, ResizeWithPadOrCrop, SpatialCrop
from monai.transforms.croppad.functional import pad_nd

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def crop_at(image: Array, centre: Sequence[int] | np.ndarray, size: Sequence[int]) -> Array:
    """A `size` crop of the last `len(size)` axes of `image` around voxel `centre`, zero where it leaves the image.

    On each axis the crop spans `centre - size // 2` up to (not including) `centre - size // 2 + size`, MONAI's
    `roi_center` rule; it may overlap the image partly or not at all. Leading axes (channels) are kept whole.

    Args:
        image: `(*lead, *S)` numpy array or tensor, or a channel-first `(C, *S)` MetaTensor (its affine is moved to
            the crop).
        centre: voxel index per cropped axis (floats are truncated).
        size: crop size per cropped axis.

    Returns:
        `(*lead, *size)` of the input's type and dtype; a numpy result never shares memory with `image`.
    """
    size_ = np.asarray(size, int)
    start = np.asarray(centre, int) - size_ // 2
    # the ROI clipped to the image (start at 0, end at the image size); zeros make up the rest
    slices = Crop.compute_slices(roi_start=start.tolist(), roi_end=(start + size_).tolist())
    shape = image.shape[image.ndim - len(size_):]
    kept = [len(range(*s.indices(n))) for s, n in zip(slices, shape, strict=True)]
    before = np.clip([s.start for s in slices] - start, 0, size_)
    widths = [(int(b), int(n - b - k)) for b, n, k in zip(before, size_, kept, strict=True)]
    padded = any(b or a for b, a in widths)
    if isinstance(image, MetaTensor):
        crop = SpatialCrop(roi_slices=slices)(image)
        return BorderPad([w for pair in widths for w in pair], mode="constant")(crop) if padded else crop
    crop = image[(..., *slices)]
    if padded:  # `pad_nd` leaves the first axis alone: give a channel-less crop one for the call
        lead = crop.ndim - len(size_)
        widened = crop if lead else crop[None]
        out = pad_nd(widened, [(0, 0)] * max(lead, 1) + widths, mode="constant")
        return out if lead else out[0]
    return crop.copy() if isinstance(crop, np.ndarray) else crop


def pad_divisible(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial dims of a batch `(B, C, *S)` to multiples of `divisor`, split evenly (the odd voxel
    after), and the slices that crop a `(B, C', *padded)` output back to `*S`.

    Returns:
        `(B, C, *padded)` (`x` itself when nothing is padded) and `(slice(None), slice(None), *spatial slices)`.
    """
    spatial = x.shape[2:]
    widths = DivisiblePad(k=divisor, method="symmetric").compute_pad_width(spatial)[1:]
    crop = tuple(slice(b, b + s) for (b, _), s in zip(widths, spatial, strict=True))
    if not any(b or a for b, a in widths):
        return x, (slice(None), slice(None), *crop)
    return pad_nd(x, [(0, 0), (0, 0), *widths], mode="constant"), (slice(None), slice(None), *crop)


def fit_size(image: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Centre crop and/or zero pad a channel-first image `(C, *S)` to `(C, *size)`, float32."""
    return torch.as_tensor(ResizeWithPadOrCrop(spatial_size=size)(image)).float()
