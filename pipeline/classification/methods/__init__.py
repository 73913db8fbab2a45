"""Few-shot methods: small wrappers over any encoder `nn.Module`, one file each, registered by name.

A method is a `FewShotMethod` (see `base.py`): `method(support_x, support_y, query_x, n_way) -> logits (Q, N)`
for evaluation, `fit`/`predict` for adapt-then-predict, and `task_loss(...)` for meta-training.
`maml.py` also holds the generic functional inner loop (`adapt`, `adapt_inference`, ...) other tasks reuse.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.classification.methods.base import FewShotMethod, TaskOut
from pipeline.classification.methods.finetune import FineTune
from pipeline.classification.methods.maml import MAML
from pipeline.classification.methods.matching import MatchingNet
from pipeline.classification.methods.metasgd import MetaSGD
from pipeline.classification.methods.protonet import ProtoNet
from pipeline.classification.methods.reptile import Reptile
from pipeline.classification.methods.siamese import Siamese
from pipeline.common.config import Config

__all__ = ["METHODS", "FewShotMethod", "TaskOut", "build_method"]


def _max_ways(cfg: Config) -> int:
    return max(cfg.episodes.ways, cfg.train.ways or 0)


def _gradient_based(kind: type[MAML]) -> Callable[[Config, nn.Module, int], nn.Module]:
    def build(cfg: Config, encoder: nn.Module, n_base: int) -> nn.Module:
        m = cfg.method
        # the MAML++ / ANIL options; `validate` refuses them for a method that does not use them (Reptile)
        options = {"multi_step_loss": m.multi_step_loss, "msl_iterations": m.msl_iterations,
                   "adapt_head": m.adapt == "head", **({"per_step_lr": True} if m.per_step_lr else {})}
        return kind(encoder, _max_ways(cfg), m.inner_steps, m.inner_lr, m.first_order, m.eval_inner_steps,
                    **options)

    return build


# name -> builder(cfg, encoder, n_base_classes)
METHODS: dict[str, Callable[[Config, nn.Module, int], nn.Module]] = {
    "protonet": lambda cfg, encoder, n_base: ProtoNet(encoder, cfg.method.distance, cfg.method.temperature,
                                                      cfg.method.normalize),
    "matching": lambda cfg, encoder, n_base: MatchingNet(encoder),
    "siamese": lambda cfg, encoder, n_base: Siamese(encoder, cfg.method.margin),
    "maml": _gradient_based(MAML),
    "metasgd": _gradient_based(MetaSGD),
    "reptile": _gradient_based(Reptile),
    "finetune": lambda cfg, encoder, n_base: FineTune(encoder, n_base, cfg.method.head_steps, cfg.method.head_lr),
}


def build_method(cfg: Config, encoder: nn.Module, n_base: int = 1) -> FewShotMethod:
    """The method named by `cfg.method.name`, wrapping `encoder`; `n_base` sizes the fine-tune head."""
    return METHODS[cfg.method.name](cfg, encoder, n_base)
