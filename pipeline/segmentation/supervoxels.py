"""Pseudo-structures for self-supervised segmentation episodes (SSL-ALPNet): supervoxels of unlabelled volumes.

A volume without labels still holds many locally homogeneous regions; treating one of them as "the structure"
gives a binary mask to meta-train a prototype network on. SLIC runs in 3D (regions span slices, so a support
slice and a neighbouring query slice share a pseudo-structure); Felzenszwalb is 2D in scikit-image and runs
slice by slice, as in SSL-ALPNet (its regions never span slices).
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb, slic

# Intensities are normalised to [0, 1]; below this a voxel counts as air / outside the body.
BODY_THRESHOLD = 0.05


def body_mask(image: np.ndarray) -> np.ndarray:
    """Voxels brighter than air; all voxels when that leaves almost nothing (e.g. an already-cropped organ)."""
    body = image > BODY_THRESHOLD
    return body if body.mean() > 0.05 else np.ones_like(body)


def supervoxels(image: np.ndarray, kind: str = "slic", n_segments: int = 60, seed: int = 0) -> np.ndarray:
    """Label map of pseudo-structures inside the body.

    Args:
        image: normalised volume `(I, J, K)`, values in [0, 1], K the axial (slice) axis.
        kind: "slic" (3D) or "felzenszwalb" (2D, per axial slice).
        n_segments: approximate number of regions per volume (SLIC) or scale parameter source (Felzenszwalb).
        seed: unused by the deterministic algorithms; kept so callers can key caches on it.

    Returns:
        int32 array `(I, J, K)`: 0 outside the body, 1..R region labels.
    """
    del seed  # both algorithms are deterministic
    body = body_mask(image)
    if kind == "slic":
        labels = slic(image.astype(np.float64), n_segments=n_segments, compactness=0.1, channel_axis=None,
                      mask=body, start_label=1, enforce_connectivity=True)
        return labels.astype(np.int32)
    if kind == "felzenszwalb":
        out = np.zeros(image.shape, np.int32)
        offset = 0
        # Scale chosen so a typical slice gives a few dozen regions, like SSL-ALPNet's scale=100 on 256^2 slices.
        scale = max(10.0, image.shape[0] * image.shape[1] / max(n_segments, 1) / 4)
        for k in range(image.shape[2]):
            seg = felzenszwalb(image[:, :, k].astype(np.float64), scale=scale, sigma=0.8, min_size=20) + 1
            seg = np.where(body[:, :, k], seg, 0)
            ids = np.unique(seg[seg > 0])
            remap = np.zeros(seg.max() + 1, np.int32)
            remap[ids] = np.arange(1, len(ids) + 1) + offset
            out[:, :, k] = remap[seg]
            offset += len(ids)
        return out
    raise ValueError(f"unknown supervoxel method {kind!r}")


def pick_region(labels: np.ndarray, rng: np.random.Generator, min_voxels: int = 20,
                max_share: float = 0.5) -> int | None:
    """A random region label that is neither tiny nor most of the array (non-trivial mask); None if none fits."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    ok = ids[(counts >= min_voxels) & (counts <= max_share * labels.size)]
    return int(rng.choice(ok)) if len(ok) else None
