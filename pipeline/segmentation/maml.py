"""MAML-adapted segmentation: a MONAI U-Net (2 output channels) meta-trained across structures.

The inner loop is `pipeline.nn.inner.adapt` (torch.func functional calls, first- or second-order): a few
gradient steps of Dice + cross-entropy (`monai.losses.DiceCELoss`) on the support views; the outer loss is the
same loss of the adapted weights on the query. Evaluation adapts with `adapt_inference` (no outer graph).
Normalisation: the MONAI U-Net's InstanceNorm has no running statistics, so nothing is mutated inside the
functional calls and train and evaluation behave identically.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from monai.losses import DiceCELoss
from torch import Tensor, nn

from pipeline.common.config import SegmentationConfig
from pipeline.nn.inner import Params, adapt, adapt_inference, call
from pipeline.segmentation.proto import _dense, backbone_divisor, build_backbone
from transforms.crop import pad_divisible

LOSS = DiceCELoss(to_onehot_y=True, softmax=True)


def build_maml_unet(scfg: SegmentationConfig) -> nn.Module:
    """The configured backbone with 2 output channels (background, foreground) as the MAML learner."""
    return build_backbone(scfg, 2 if scfg.mode == "2d" else 3, out_channels=2)


def logits(net: nn.Module, params: Params, x: Tensor, divisor: int) -> Tensor:
    """`(B, 2, *S)` logits of `x (B, 1, *S)` with `params` (padded for the backbone, cropped back)."""
    xp, crop = pad_divisible(x, divisor)
    return call(net, params, xp)[crop]


def task_loss(net: nn.Module, scfg: SegmentationConfig, sx: Tensor, sm: Tensor, qx: Tensor, qm: Tensor) -> Tensor:
    """Query Dice+CE after `inner_steps` support steps, differentiable w.r.t. the meta-parameters."""
    div = backbone_divisor(scfg)
    fast = adapt(dict(net.named_parameters()), lambda p: LOSS(logits(net, p, sx, div), sm), scfg.inner_steps,
                 scfg.inner_lr, first_order=scfg.first_order)
    return LOSS(logits(net, fast, qx, div), qm)


def adapt_maml(net: nn.Module, scfg: SegmentationConfig, images: list[Tensor], masks: list[Tensor],
               seed: int = 0) -> Params:
    """Fast weights after `inner_steps` support steps (batches as in the fine-tuning baseline), no outer graph."""
    from pipeline.segmentation.finetune import support_batch

    rng = np.random.default_rng(seed)
    div = backbone_divisor(scfg)
    batches = iter([support_batch(images, masks, scfg, rng) for _ in range(scfg.inner_steps)])

    def support_loss(p: Params) -> Tensor:
        x, m = next(batches)
        return LOSS(logits(net, p, x, div), m)

    return adapt_inference(dict(net.named_parameters()), support_loss, scfg.inner_steps, scfg.inner_lr)


def maml_predictor(net: nn.Module, scfg: SegmentationConfig, fast: Params) -> Callable[[Tensor], Tensor]:
    """`x (B, 1, *S) -> logits (B, 2, *S)` with the adapted weights (sliding windows of `crop` in 3D)."""
    div = backbone_divisor(scfg)
    roi = tuple(scfg.crop) if scfg.mode == "3d" else None
    return lambda x: _dense(lambda w: logits(net, fast, w, div), x, roi)


def fit_maml(net: nn.Module, scfg: SegmentationConfig, images: list[Tensor], masks: list[Tensor],
             seed: int = 0) -> Callable[[Tensor], Tensor]:
    """Adapt on the support, then predict with the fast weights."""
    return maml_predictor(net, scfg, adapt_maml(net, scfg, images, masks, seed))
