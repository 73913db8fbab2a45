"""What every few-shot method offers: `fit`/`predict` for inference, `task_loss` for meta-training.

- `fit(support_x, support_y, n_way) -> state`: adapt to one task; the state is a dict of tensors (prototypes,
  adapted weights, a fitted head, ...) that `adapt` saves with safetensors. Never builds an outer graph.
- `predict(state, query_x) -> logits (Q, N)`.
- `forward(support_x, support_y, query_x, n_way)`: `predict(fit(...), query_x)`, the evaluation path.
- `task_loss(support_x, support_y, query_x, query_y, n_way, classes) -> TaskOut`: the differentiable meta-loss of
  one task; `loss.backward()` accumulates that task's meta-gradient into the parameters. `classes` holds the
  global base-class indices `(N,)` of the episode's classes (used by the fine-tune baseline's pre-training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

State = dict[str, Tensor]


@dataclass
class TaskOut:
    """One task's meta-training result: `loss` to back-propagate, query `logits (Q, N)` for monitoring."""

    loss: Tensor
    logits: Tensor


class FewShotMethod(nn.Module):
    """Base class: subclasses implement `fit` and `predict`; the default `task_loss` is query cross-entropy."""

    # The meta-iteration being trained, set by the training loop before each one: schedules that change over
    # training (MAML++'s multi-step loss weights) read it. A plain attribute, so not part of the saved weights.
    meta_iteration: int = 0

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        raise NotImplementedError

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        """Query logits `(Q, N)` for queries `(Q, C, *spatial)` given support `(S, C, *spatial)`."""
        return self.predict(self.fit(support_x, support_y, n_way), query_x)

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        logits = self.logits_for_training(support_x, support_y, query_x, n_way)
        return TaskOut(F.cross_entropy(logits, query_y), logits)

    def logits_for_training(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        """Differentiable query logits; methods whose `fit` detaches override this."""
        raise NotImplementedError
