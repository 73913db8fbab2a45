"""Prototype segmentation (PANet / SSL-ALPNet): masked average pooling + adaptive local prototypes, cosine decoding.

The backbone maps an image `(B, 1, *S)` to a dense feature map `(B, F, *S)` (a `monai.networks.nets` U-Net-like
net, full resolution, so masks need no down-sampling). From the support features and masks we pool one global
foreground and one global background prototype (masked average pooling, PANet) plus local prototypes from a grid
of `local_pool`-sized windows lying (almost) wholly inside the foreground or the background (ALPNet). Each query
voxel scores a class by the softmax-weighted cosine similarity to that class's prototypes, times `scale`.
Works for 2D slices (`spatial_dims=2`) and 3D volumes alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet, SegResNet, UNet
from torch import nn

from pipeline.common.config import SegmentationConfig
from transforms.crop import pad_divisible

EPS = 1e-5
SCORE_CHUNK = 64  # prototypes scored at a time when predicting (memory (Q, SCORE_CHUNK, *S))
PROTOTYPE_CAP = 1024  # most prototypes per class from a support set (adapt / predict on many slices)


def build_backbone(scfg: SegmentationConfig, spatial_dims: int, out_channels: int | None = None) -> nn.Module:
    """The dense backbone named by `scfg.encoder`: `(B, 1, *S) -> (B, out_channels or features, *S)`."""
    out = out_channels or scfg.features
    ch = list(scfg.channels)
    if scfg.encoder == "unet":
        return UNet(spatial_dims, 1, out, channels=ch, strides=(2,) * (len(ch) - 1), num_res_units=1)
    if scfg.encoder == "basicunet":
        c = [*ch, ch[-1], ch[-1], ch[-1], ch[-1]]
        return BasicUNet(spatial_dims, 1, out, features=(c[0], c[0], c[1], c[2], c[3], c[0]))
    return SegResNet(spatial_dims, init_filters=ch[0], in_channels=1, out_channels=out,
                     norm=("GROUP", {"num_groups": min(8, ch[0])}),  # widths double from ch[0]: groups divide them
                     blocks_down=(1,) * len(ch), blocks_up=(1,) * (len(ch) - 1))


def backbone_divisor(scfg: SegmentationConfig) -> int:
    """Input sizes must be multiples of this (2 ** number of 2x down-samplings of the backbone).

    BasicUNet down-samples 4 times and its InstanceNorm needs more than one voxel at the bottom: 32, not 16.
    """
    return {"unet": 2 ** (len(scfg.channels) - 1), "basicunet": 32, "segresnet": 2 ** (len(scfg.channels) - 1)}[
        scfg.encoder]


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean feature vector over the masked voxels of all support items.

    Args:
        features: `(K, F, *S)`.
        mask: `(K, 1, *S)` in {0, 1} (soft weights also work).

    Returns:
        `(F,)`; the zero vector when the mask is empty.
    """
    dims = [0, *range(2, features.dim())]
    return (features * mask).sum(dims) / (mask.sum(dims) + EPS)


def local_prototypes(features: torch.Tensor, mask: torch.Tensor, pool: int, threshold: float,
                     max_windows: int = 256) -> torch.Tensor:
    """Adaptive local prototypes: mean features of grid windows at least `threshold` inside the mask.

    Args:
        features: `(K, F, *S)`; mask: `(K, 1, *S)`.
        pool: window edge in voxels; grown so an item has at most `max_windows` windows (our features are full
            resolution, so large slices/volumes would otherwise give thousands of prototypes and score tensors
            of `(Q, P, *S)` in the gigabytes; ALPNet pools on 1/8-resolution features).

    Returns:
        `(P, F)` with P >= 0 windows kept.
    """
    avg = F.avg_pool3d if features.dim() == 5 else F.avg_pool2d
    spatial = features.shape[2:]
    pool = max(pool, math.ceil((math.prod(spatial) / max_windows) ** (1 / len(spatial))))
    k = [min(pool, s) for s in spatial]
    fsum = avg(features * mask, k, stride=k)
    share = avg(mask, k, stride=k)
    keep = (share >= threshold).flatten()  # (K * windows,)
    protos = (fsum / (share + EPS)).movedim(1, -1).reshape(-1, features.shape[1])
    return protos[keep]


def class_scores(query: torch.Tensor, protos: torch.Tensor, scale: float, chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """Per-voxel score of one class: softmax-weighted scaled cosine similarity to its prototypes.

    Without gradients (prediction), prototypes are taken `chunk` at a time with a running maximum (the streaming
    softmax), so memory is `(Q, chunk, *S)` whatever P; with gradients (training) in one go.

    Args:
        query: `(Q, F, *S)`; protos: `(P, F)`, P >= 1.

    Returns:
        `(Q, *S)`.
    """
    q, p = F.normalize(query, dim=1), F.normalize(protos, dim=1, eps=EPS)
    if torch.is_grad_enabled() or len(p) <= chunk:
        sims = scale * torch.einsum("qf...,pf->qp...", q, p)
        return (sims.softmax(dim=1) * sims).sum(dim=1)
    top = num = den = None
    for start in range(0, len(p), chunk):
        sims = scale * torch.einsum("qf...,pf->qp...", q, p[start:start + chunk])
        m = sims.amax(dim=1)
        if top is None:
            top, num, den = m, torch.zeros_like(m), torch.zeros_like(m)
        new = torch.maximum(top, m)
        rescale = torch.exp(top - new)
        w = torch.exp(sims - new.unsqueeze(1))
        num, den, top = num * rescale + (w * sims).sum(dim=1), den * rescale + w.sum(dim=1), new
    return num / den


def cap_prototypes(protos: torch.Tensor, cap: int = PROTOTYPE_CAP) -> torch.Tensor:
    """At most `cap` prototypes `(P', F)`: the global one (row 0) and evenly spaced local ones, deterministic.

    Many support slices give thousands of local prototypes (each slice up to `local_max`), and scoring cost grows
    with their number; neighbouring windows of neighbouring slices are near duplicates.
    """
    if len(protos) <= cap:
        return protos
    keep = torch.linspace(1, len(protos) - 1, cap - 1, device=protos.device).round().long()
    return torch.cat([protos[:1], protos[keep]])


class ProtoSeg(nn.Module):
    """Few-shot binary segmentation by prototypes over a dense backbone.

    Call as `model(support_x, support_mask, query_x) -> logits (Q, 2, *S)` (channel 0 background, 1 foreground).
    """

    def __init__(self, backbone: nn.Module, divisor: int = 1, scale: float = 20.0, local_pool: int = 4,
                 local_threshold: float = 0.95, use_local: bool = True, local_max: int = 256,
                 score_stride: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.divisor = divisor
        self.scale = scale
        self.local_pool = local_pool
        self.local_threshold = local_threshold
        self.use_local = use_local
        self.local_max = local_max
        self.score_stride = score_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features `(B, F, *S)` of images `(B, 1, *S)` of any size (padded for the backbone, then cropped)."""
        padded, crop = pad_divisible(x, self.divisor)
        return self.backbone(padded)[crop]

    def prototypes(self, fs: torch.Tensor, sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Background and foreground prototypes `(P_bg, F)`, `(P_fg, F)`: global first, then local ones."""
        out = []
        for m in (1.0 - sm, sm):
            protos = [masked_average_pooling(fs, m)[None]]
            if self.use_local:
                protos.append(local_prototypes(fs, m, self.local_pool, self.local_threshold, self.local_max))
            out.append(torch.cat(protos))
        return out[0], out[1]

    def decode(self, fq: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        """Logits `(Q, 2, *S)` of query features against the prototypes.

        At prediction (no gradients) with `score_stride` s > 1, the features are average-pooled s x s (x s) first and
        the logits interpolated back: scoring is the cost of prediction (every voxel against up to
        `PROTOTYPE_CAP` prototypes), and it falls by s^2 (2D) or s^3 (3D).
        """
        s = self.score_stride
        if s == 1 or torch.is_grad_enabled():
            return torch.stack([class_scores(fq, bg, self.scale), class_scores(fq, fg, self.scale)], dim=1)
        size = fq.shape[2:]
        pool = F.avg_pool3d if fq.dim() == 5 else F.avg_pool2d
        coarse = pool(fq, [min(s, n) for n in size], ceil_mode=True)
        logits = torch.stack([class_scores(coarse, bg, self.scale), class_scores(coarse, fg, self.scale)], dim=1)
        return F.interpolate(logits, size=size, mode="trilinear" if fq.dim() == 5 else "bilinear",
                             align_corners=False)

    def forward(self, sx: torch.Tensor, sm: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        bg, fg = self.prototypes(self.features(sx), sm)
        return self.decode(self.features(qx), bg, fg)


def support_prototypes(model: ProtoSeg, images: list[torch.Tensor], masks: list[torch.Tensor],
                       roi: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and foreground prototypes `(P_bg, F)`, `(P_fg, F)` from support items of any sizes.

    Args:
        images, masks: lists of `(n_i, 1, *S_i)` support images and binary masks (2D slices or 3D volumes).
        roi: with a window size, support features come from sliding-window inference (large 3D volumes).
    """
    feats = [_dense(model.features, x, roi) for x in images]
    fg_parts, bg_parts = [], []
    # Global prototypes: pooled over every masked voxel of every item (flattened so sizes may differ).
    flat_f = torch.cat([f.movedim(1, 0).reshape(f.shape[1], -1) for f in feats], 1)[None]  # (1, F, N)
    flat_m = torch.cat([m.reshape(1, -1) for m in masks], 1)[None].float()  # (1, 1, N)
    for mask_of, parts in ((lambda m: 1.0 - m, bg_parts), (lambda m: m, fg_parts)):
        parts.append(masked_average_pooling(flat_f, mask_of(flat_m))[None])
        if model.use_local:
            parts += [local_prototypes(f, mask_of(m.float()), model.local_pool, model.local_threshold,
                                       model.local_max) for f, m in zip(feats, masks, strict=True)]
    return cap_prototypes(torch.cat(bg_parts)), cap_prototypes(torch.cat(fg_parts))


def proto_predictor(model: ProtoSeg, bg: torch.Tensor, fg: torch.Tensor,
                    roi: tuple[int, ...] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x (B, 1, *S) -> logits (B, 2, *S)` against fixed prototypes (sliding windows of `roi` when larger)."""
    return lambda x: model.decode(_dense(model.features, x, roi), bg, fg)


def fit_proto(model: ProtoSeg, images: list[torch.Tensor], masks: list[torch.Tensor],
              roi: tuple[int, ...] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prototypes of the support (`support_prototypes`), then the query predictor (`proto_predictor`)."""
    return proto_predictor(model, *support_prototypes(model, images, masks, roi), roi)


def _dense(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           roi: tuple[int, ...] | None) -> torch.Tensor:
    """`fn(x)` directly, or by sliding windows of `roi` (Gaussian-weighted, 25% overlap) when x is larger."""
    if roi is None or all(s <= r for s, r in zip(x.shape[2:], roi, strict=True)):
        return fn(x)
    return sliding_window_inference(x, roi_size=roi, sw_batch_size=2, predictor=fn, overlap=0.25, mode="gaussian")


def build_proto_seg(scfg: SegmentationConfig) -> ProtoSeg:
    """A `ProtoSeg` over the configured backbone, 2D or 3D per `scfg.mode`."""
    dims = 2 if scfg.mode == "2d" else 3
    return ProtoSeg(build_backbone(scfg, dims), backbone_divisor(scfg), scfg.scale, scfg.local_pool,
                    scfg.local_threshold, local_max=scfg.local_max, score_stride=scfg.score_stride)
