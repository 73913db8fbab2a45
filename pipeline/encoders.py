"""Encoders by name, built from `monai.networks` blocks."""

from __future__ import annotations

from collections.abc import Callable

from monai.networks.blocks import Convolution
from torch import nn

from pipeline.config import ModelConfig


def conv_encoder(spatial_dims: int, in_channels: int, channels: list[int], norm_groups: int = 8) -> nn.Sequential:
    """Conv-GroupNorm-ReLU-MaxPool blocks, then global average pooling.

    Maps `(B, in_channels, *spatial)` to embeddings `(B, channels[-1])`. GroupNorm instead of BatchNorm: it
    does not depend on which items share a batch, so support and query embed identically in train and eval.
    """
    pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
    gap = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in channels:
        layers += [
            Convolution(spatial_dims, c_in, c_out, kernel_size=3, act="RELU",
                        norm=("GROUP", {"num_groups": min(norm_groups, c_out)})),
            pool(2),
        ]
        c_in = c_out
    layers += [gap(1), nn.Flatten()]
    return nn.Sequential(*layers)


ENCODERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "conv3d": lambda cfg, c_in: conv_encoder(3, c_in, cfg.channels, cfg.norm_groups),
}


def build_encoder(cfg: ModelConfig, in_channels: int = 1) -> nn.Module:
    """The encoder named by `cfg.encoder`."""
    return ENCODERS[cfg.encoder](cfg, in_channels)
