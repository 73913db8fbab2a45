"""Encoders by name (`ENCODERS`), built from `monai.networks` blocks and nets.

Every encoder maps `(B, C, *spatial)` to embeddings `(B, D)` and carries `out_dim = D`.

Normalisation policy (`model.norm`), the same in meta-training, evaluation and inside MAML's functional inner
loop: `group` (GroupNorm, default) and `instance` (InstanceNorm with affine) never depend on which items share a
batch; `batch` is BatchNorm with `track_running_stats=False`, i.e. *batch statistics at every call* (each inner
step and the query pass use their own batch's statistics, train and eval alike), so no running buffers are
updated inside `torch.func.functional_call` and evaluation behaves as training did. Avoid `batch` with
`method.vmap` and second-order MAML (wrong gradients on torch 2.13, see `pipeline/nn/inner.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import resnet10, resnet18
from torch import nn

from pipeline.common.config import ModelConfig


def norm_spec(norm: str, channels: int, groups: int = 8) -> tuple[str, dict[str, Any]]:
    """MONAI `norm=` argument for the policy named by `norm` (see the module docstring)."""
    if norm == "batch":
        return ("BATCH", {"track_running_stats": False})
    if norm == "instance":
        return ("INSTANCE", {"affine": True})
    return ("GROUP", {"num_groups": min(groups, channels)})


def conv_encoder(spatial_dims: int, in_channels: int, channels: list[int], norm_groups: int = 8,
                 norm: str = "group", pool_size: int = 1) -> nn.Sequential:
    """Conv-Norm-ReLU-MaxPool blocks, then adaptive average pooling to a `pool_size`-wide grid.

    Maps `(B, in_channels, *spatial)` to embeddings `(B, channels[-1] * pool_size**spatial_dims)`.
    `pool_size=1` is global average pooling; a larger grid keeps coarse position (where in the crop a
    feature sits), which shape-defined classes such as lesion morphologies need, as the original
    ProtoNet Conv4 did by flattening its last feature map.
    """
    pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
    gap = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in channels:
        # conv -> norm -> max-pool -> ReLU: the same function as norm -> ReLU -> pool, cheaper (pipeline/nn/layers.py)
        layers += [
            Convolution(spatial_dims, c_in, c_out, kernel_size=3, act=None, norm=norm_spec(norm, c_out, norm_groups)),
            nn.Sequential(pool(2), nn.ReLU()),
        ]
        c_in = c_out
    layers += [gap(pool_size), nn.Flatten()]
    net = nn.Sequential(*layers)
    net.out_dim = channels[-1] * pool_size**spatial_dims
    return net


def resnet_encoder(depth: int, spatial_dims: int, in_channels: int, norm: str, norm_groups: int) -> nn.Module:
    """MONAI ResNet-10/18 as a feature extractor (`feed_forward=False`): `(B, C, *spatial) -> (B, 512)`."""
    factory = {10: resnet10, 18: resnet18}[depth]
    net = factory(spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False)
    # MONAI 1.6.1 does not pass `norm` on to the residual blocks, so swap every norm layer here instead.
    _replace_norms(net, spatial_dims, norm, norm_groups)
    net.out_dim = 512
    return net


def _replace_norms(module: nn.Module, spatial_dims: int, norm: str, groups: int) -> None:
    """Replace every BatchNorm in `module` (in place) by the layer the policy `norm` names, same channel count."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            spec = norm_spec(norm, child.num_features, groups)
            setattr(module, name, get_norm_layer(name=spec, spatial_dims=spatial_dims, channels=child.num_features))
        else:
            _replace_norms(child, spatial_dims, norm, groups)


ENCODERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "conv3d": lambda cfg, c_in: conv_encoder(3, c_in, cfg.channels, cfg.norm_groups, cfg.norm, cfg.pool_size),
    "conv4_2d": lambda cfg, c_in: conv_encoder(2, c_in, [cfg.filters] * 4, cfg.norm_groups, cfg.norm, cfg.pool_size),
    "conv4_3d": lambda cfg, c_in: conv_encoder(3, c_in, [cfg.filters] * 4, cfg.norm_groups, cfg.norm, cfg.pool_size),
    "resnet10_2d": lambda cfg, c_in: resnet_encoder(10, 2, c_in, cfg.norm, cfg.norm_groups),
    "resnet18_2d": lambda cfg, c_in: resnet_encoder(18, 2, c_in, cfg.norm, cfg.norm_groups),
    "resnet10_3d": lambda cfg, c_in: resnet_encoder(10, 3, c_in, cfg.norm, cfg.norm_groups),
    "resnet18_3d": lambda cfg, c_in: resnet_encoder(18, 3, c_in, cfg.norm, cfg.norm_groups),
}


def build_encoder(cfg: ModelConfig, in_channels: int | None = None) -> nn.Module:
    """The encoder named by `cfg.encoder` (input channels default to `cfg.in_channels`)."""
    return ENCODERS[cfg.encoder](cfg, in_channels or cfg.in_channels)
