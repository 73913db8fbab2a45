"""Meta-SGD (Li et al., 2017): MAML with a learned inner step size per parameter element."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.classification.methods.maml import MAML
from pipeline.nn.inner import StepSize


class MetaSGD(MAML):
    """MAML whose inner step sizes are meta-learned tensors shaped like the parameters (initialised to `inner_lr`).

    The step sizes live in `self.lrs` (a `ParameterList` in `net.named_parameters()` order) and receive
    meta-gradients through the differentiable inner loop (also in first-order mode, where the fast weights stay a
    function of the step sizes).
    """

    def __init__(self, encoder: nn.Module, max_ways: int, inner_steps: int = 1, inner_lr: float = 0.01,
                 first_order: bool = False, eval_steps: int | None = None) -> None:
        super().__init__(encoder, max_ways, inner_steps, inner_lr, first_order, eval_steps)
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p, inner_lr)) for p in self.net.parameters()])

    def step_sizes(self) -> StepSize:
        return {name: lr for (name, _), lr in zip(self.net.named_parameters(), self.lrs, strict=True)}
