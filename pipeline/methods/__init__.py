"""Few-shot methods: small wrappers over any encoder `nn.Module`, one file each, registered by name.

A method is an `nn.Module` called as `method(support_x, support_y, query_x, n_way) -> logits (Q, N)`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.config import Config
from pipeline.methods.protonet import ProtoNet

METHODS: dict[str, Callable[[Config, nn.Module], nn.Module]] = {
    "protonet": lambda cfg, encoder: ProtoNet(encoder, cfg.method.distance),
}


def build_method(cfg: Config, encoder: nn.Module) -> nn.Module:
    """The method named by `cfg.method.name`, wrapping `encoder`."""
    return METHODS[cfg.method.name](cfg, encoder)
