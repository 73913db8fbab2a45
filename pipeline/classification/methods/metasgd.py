"""Meta-SGD (Li et al., 2017): MAML with a learned inner step size per parameter element."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.classification.methods.maml import MAML, learned_step_sizes
from pipeline.nn.inner import StepSize


class MetaSGD(MAML):
    """MAML whose inner step sizes are meta-learned tensors shaped like the parameters (initialised to `inner_lr`).

    The step sizes live in `self.lrs` (a `ParameterList` in the order of the adapted parameters, `inner_names`:
    every one of `net.named_parameters()`, or the head's alone with `adapt_head`) and receive meta-gradients
    through the differentiable inner loop (also in first-order mode, where the fast weights stay a function of the
    step sizes). MAML's other options (`multi_step_loss`, `adapt_head`) apply unchanged; `per_step_lr` does not.
    """

    def __init__(self, encoder: nn.Module, max_ways: int, inner_steps: int = 1, inner_lr: float = 0.01,
                 first_order: bool = False, eval_steps: int | None = None, **options: Any) -> None:
        if options.get("per_step_lr"):
            raise ValueError("Meta-SGD learns per-element step sizes already; per_step_lr is a MAML option")
        super().__init__(encoder, max_ways, inner_steps, inner_lr, first_order, eval_steps, **options)
        self.lrs = learned_step_sizes(self._inner(self.params()), inner_lr)

    def step_sizes(self) -> StepSize:
        return dict(zip(self.inner_names, self.lrs, strict=True))
