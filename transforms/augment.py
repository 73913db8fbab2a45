"""Training-only augmentation of episode tensors: MONAI random transforms, plus torchio's bias field, motion and
ghosting (MR artefacts MONAI lacks).

The deterministic preset runs once per volume and its output is kept in memory; this random part is drawn afresh
for every training episode, on its support and query tensors (segmentation: `augment_view`, per view). Evaluation
never calls it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)

from datasets.volume import FewscanError
from transforms.config import AugmentConfig


class EpisodeAugmenter:
    """Random augmentation of a batch of items, reproducible from a NumPy generator.

    Args:
        cfg: the `transforms.augment` config section.
        spatial_dims: 2 for `(B, C, H, W)` items, 3 for `(B, C, I, J, K)`.
    """

    def __init__(self, cfg: AugmentConfig, spatial_dims: int) -> None:
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        p = cfg.prob
        steps: list = []
        for axis in cfg.flip_axes:
            if not 0 <= axis < spatial_dims:
                raise ValueError(f"augment.flip_axes: axis {axis} out of range for {spatial_dims}D items")
            steps.append(RandFlip(prob=p, spatial_axis=axis))
        if cfg.rotate_deg or cfg.scale or cfg.translate:
            angle = math.radians(cfg.rotate_deg)
            steps.append(RandAffine(prob=p, rotate_range=[angle] * (1 if spatial_dims == 2 else 3),
                                    scale_range=[cfg.scale] * spatial_dims,
                                    translate_range=[cfg.translate] * spatial_dims,
                                    padding_mode="border", mode="bilinear"))
        if cfg.intensity_scale:
            steps.append(RandScaleIntensity(factors=cfg.intensity_scale, prob=p))
        if cfg.intensity_shift:
            steps.append(RandShiftIntensity(offsets=cfg.intensity_shift, prob=p))
        if cfg.gamma is not None:
            steps.append(RandAdjustContrast(prob=p, gamma=tuple(cfg.gamma)))
        if cfg.noise_std:
            steps.append(RandGaussianNoise(prob=p, std=cfg.noise_std))
        self.monai = Compose(steps)
        self.torchio = self._torchio()

    def _torchio(self):  # noqa: ANN202 - a torchio Compose or None
        """torchio's MR artefacts; they need 4D `(C, W, H, D)` tensors, so 2D items get a unit depth."""
        if not (self.cfg.bias_field or self.cfg.motion or self.cfg.ghosting):
            return None
        import torchio as tio

        steps = []
        if self.cfg.bias_field:
            steps.append(tio.RandomBiasField(coefficients=self.cfg.bias_field, p=self.cfg.prob))
        if self.cfg.motion:
            steps.append(tio.RandomMotion(degrees=5, translation=5, num_transforms=2, p=self.cfg.motion))
        if self.cfg.ghosting:
            steps.append(tio.RandomGhosting(p=self.cfg.ghosting))
        return tio.Compose(steps)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment each item of `x` `(B, C, *spatial)` independently; returns a new tensor of the same shape."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected (B, C, {self.spatial_dims} spatial axes), got shape {tuple(x.shape)}")
        seed = int(rng.integers(2**31 - 1))
        self.monai.set_random_state(seed=seed)
        out = []
        # Items carry no geometry here: skipping MONAI's metadata tracking saves about a quarter of the time.
        tracking = get_track_meta()
        set_track_meta(False)
        # torchio draws from torch's global generator: fork it so the caller's stream is untouched.
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for item in x:
                    y = self.monai(item)
                    y = y.as_tensor() if isinstance(y, MetaTensor) else torch.as_tensor(y)
                    if self.torchio is not None:
                        y = self._apply_torchio(y)
                    out.append(y.to(x.dtype))
        finally:
            set_track_meta(tracking)
        return torch.stack(out)

    def _apply_torchio(self, item: torch.Tensor) -> torch.Tensor:
        vol = item[..., None] if self.spatial_dims == 2 else item
        # torchio's bias field multiplies intensities: keep them positive for it, then shift back.
        low = float(vol.min())
        res = self.torchio(vol.float() - low + 1e-3) + low - 1e-3
        res = torch.as_tensor(res)
        return res[..., 0] if self.spatial_dims == 2 else res


def build_augmenter(cfg: AugmentConfig, spatial_dims: int) -> EpisodeAugmenter | None:
    """The augmenter for training episodes, or None when augmentation is off."""
    return EpisodeAugmenter(cfg, spatial_dims) if cfg.enabled else None


# Segmentation views: only intensity changes, since a spatial one would have to move the mask along with the image.
VIEW_KEYS = ("enabled", "prob", "gamma", "noise_std")
_VIEW_OFF: dict[str, object] = {"flip_axes": [], "rotate_deg": 0.0, "scale": 0.0, "translate": 0.0,
                                "intensity_shift": 0.0, "intensity_scale": 0.0, "bias_field": 0.0, "motion": 0.0,
                                "ghosting": 0.0}


def check_view_augment(cfg: AugmentConfig) -> None:
    """Refuse `transforms.augment` keys that `augment_view` does not apply (set them to 0 or [] for segmentation).

    Raises:
        FewscanError: naming every such key that is set.
    """
    if not cfg.enabled:
        return
    bad = [f"{key}={getattr(cfg, key)}" for key, off in _VIEW_OFF.items() if getattr(cfg, key) != off]
    if bad:
        raise FewscanError(f"transforms.augment: segmentation augments intensities only ({', '.join(VIEW_KEYS)}); "
                           f"set {', '.join(bad)} to 0 (flip_axes to [])")


def augment_view(x: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Training-only intensity change of one segmentation view in [0, 1] (its mask is left as it is).

    A gamma drawn log-uniformly from `cfg.gamma` (`x ** gamma`), then Gaussian noise of `cfg.noise_std`, the result
    clipped to [0, 1]. Each is applied with probability `cfg.prob`; a coin is drawn only when `prob < 1`. Every draw
    comes from `rng`, in this order, so a training episode is a function of its generator.

    Args:
        x: `(H, W)` or `(I, J, K)` float32 view.

    Returns:
        float32 array of the same shape.
    """
    y = x
    if cfg.gamma is not None and (cfg.prob >= 1 or rng.random() < cfg.prob):
        low, high = cfg.gamma
        y = y ** float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if cfg.noise_std and (cfg.prob >= 1 or rng.random() < cfg.prob):
        y = y + rng.normal(0, cfg.noise_std, y.shape)
    return np.clip(y, 0, 1).astype(np.float32)
