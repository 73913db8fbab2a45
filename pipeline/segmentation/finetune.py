"""Fine-tuning baseline: the meta-trained backbone plus a fresh 1x1 head, trained on the support set only."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from pipeline.common.config import SegmentationConfig
from pipeline.segmentation.proto import _dense
from transforms.crop import crop_at, pad_divisible


def support_batch(images: list[torch.Tensor], masks: list[torch.Tensor], scfg: SegmentationConfig,
                  rng: np.random.Generator, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch from the support: 2D slices, or 3D crops of `scfg.crop` around a foreground voxel.

    Args:
        images, masks: lists of `(n_i, 1, *S_i)` tensors.

    Returns:
        `(B, 1, *S)` images and masks (2D: the slices of one support item; 3D: `crop`-sized crops).
    """
    i = int(rng.integers(len(images)))
    x, m = images[i], masks[i]
    if x.dim() == 4:  # 2D slices (n, 1, H, W): a random subset of one item's slices
        idx = rng.choice(x.shape[0], size=min(batch, x.shape[0]), replace=False)
        return x[idx], m[idx]
    xs, ms = [], []
    arr, marr = x[0, 0].cpu().numpy(), m[0, 0].cpu().numpy()  # crops are cut on the CPU, trained on x's device
    fg = np.argwhere(marr > 0)
    for _ in range(min(batch, 2)):
        centre = fg[int(rng.integers(len(fg)))] if len(fg) else np.asarray(arr.shape) // 2
        xs.append(crop_at(arr, centre, tuple(scfg.crop)))
        ms.append(crop_at(marr, centre, tuple(scfg.crop)))
    return torch.from_numpy(np.stack(xs)[:, None]).to(x.device), torch.from_numpy(np.stack(ms)[:, None]).to(x.device)


def fit_finetune(backbone: nn.Module, divisor: int, scfg: SegmentationConfig, images: list[torch.Tensor],
                 masks: list[torch.Tensor], seed: int = 0, head: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Copy `backbone`, add a 1x1 conv head (features -> 2), train `finetune_steps` Adam steps on the support.

    With `head=False` the backbone already outputs 2 channels (the MAML U-Net) and is fine-tuned as it is.

    Returns:
        predictor `x (B, 1, *S) -> logits (B, 2, *S)` (sliding windows of `crop` for large 3D volumes).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dims = images[0].dim() - 2
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    layers = [copy.deepcopy(backbone)] + ([conv(scfg.features, 2, kernel_size=1)] if head else [])
    net = nn.Sequential(*layers).to(images[0].device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(scfg.finetune_steps):
        x, m = support_batch(images, masks, scfg, rng)
        xp, crop = pad_divisible(x, divisor)
        loss = loss_fn(net(xp)[crop], m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        xp, crop = pad_divisible(x, divisor)
        return net(xp)[crop]

    roi = tuple(scfg.crop) if dims == 3 else None
    return lambda x: _dense(forward, x, roi)
