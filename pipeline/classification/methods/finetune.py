"""Fine-tune baseline (Chen et al., 2019 "Baseline"): pre-train a classifier on all base classes, then fit a
new linear head on each task's support embeddings with the encoder frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State, TaskOut
from pipeline.nn.fast import speed_up


def fit_head(z: Tensor, y: Tensor, n_way: int, steps: int = 100, lr: float = 0.01) -> tuple[Tensor, Tensor]:
    """Full-batch Adam on a zero-initialised linear head over fixed embeddings.

    Args:
        z: support embeddings `(S, D)` (detached); y: labels `(S,)`.

    Returns:
        weight `(N, D)` and bias `(N,)`.
    """
    weight = torch.zeros(n_way, z.shape[1], device=z.device, requires_grad=True)
    bias = torch.zeros(n_way, device=z.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(z @ weight.T + bias, y).backward()
            opt.step()
    return weight.detach(), bias.detach()


class FineTune(FewShotMethod):
    """Encoder + a `n_base`-way head, pre-trained with plain cross-entropy on base-class labels.

    Args:
        encoder: maps `(B, C, *spatial)` to `(B, D)` with `encoder.out_dim == D`.
        n_base: number of base classes (the pre-training head's width).
        steps, lr: the new head's fit on each support set.
    """

    def __init__(self, encoder: nn.Module, n_base: int, steps: int = 100, lr: float = 0.01) -> None:
        super().__init__()
        self.encoder = speed_up(encoder)  # exact, faster pools (pipeline/nn/layers.py)
        self.head = nn.Linear(encoder.out_dim, max(n_base, 1))
        self.steps, self.lr = steps, lr

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        """Cross-entropy over all base classes for every item of the episode (it is just a batch here)."""
        if classes is None:
            raise ValueError("FineTune pre-training needs the episode's global base-class indices")
        logits = self.head(self.encoder(torch.cat([support_x, query_x])))
        loss = F.cross_entropy(logits, classes[torch.cat([support_y, query_y])])
        return TaskOut(loss, logits[len(support_x):, classes].detach())

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        with torch.no_grad():
            z = self.encoder(support_x)
        weight, bias = fit_head(z, support_y, n_way, self.steps, self.lr)
        return {"weight": weight, "bias": bias}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return self.encoder(query_x) @ state["weight"].T + state["bias"]
