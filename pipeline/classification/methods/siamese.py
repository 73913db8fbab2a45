"""Siamese network (Koch et al., 2015; Hadsell et al., 2006): contrastive pair loss, nearest-support prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State, TaskOut
from pipeline.nn.fast import speed_up


def contrastive_loss(z: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """Mean over all pairs i<j of `d^2` (same class) or `max(0, margin - d)^2` (different classes).

    Args:
        z: embeddings `(B, D)`, compared after L2 normalisation (so distances lie in [0, 2]); y: labels `(B,)`.
    """
    z = F.normalize(z, dim=-1)
    d = torch.cdist(z, z)
    same = (y[:, None] == y[None, :]).to(z.dtype)
    pair = same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)
    upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
    return pair[upper].mean()


def nearest_support_logits(query: Tensor, support: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """Logits `(Q, N)`: minus the distance from each query to its nearest support item of each class."""
    d = torch.cdist(F.normalize(query, dim=-1), F.normalize(support, dim=-1))  # (Q, S)
    mask = F.one_hot(support_y, n_way).T.bool()  # (N, S)
    return -torch.stack([d[:, m].min(dim=1).values for m in mask], dim=1)


class Siamese(FewShotMethod):
    """Siamese embedding trained with the contrastive loss on every pair of an episode's items."""

    def __init__(self, encoder: nn.Module, margin: float = 1.0) -> None:
        super().__init__()
        self.encoder, self.margin = speed_up(encoder), margin  # exact, faster pools (pipeline/nn/layers.py)

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        z = self.encoder(torch.cat([support_x, query_x]))
        loss = contrastive_loss(z, torch.cat([support_y, query_y]), self.margin)
        logits = nearest_support_logits(z[len(support_x):].detach(), z[: len(support_x)].detach(), support_y, n_way)
        return TaskOut(loss, logits)

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        with torch.no_grad():
            return {"support": self.encoder(support_x), "labels": support_y, "n_way": torch.tensor(n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return nearest_support_logits(self.encoder(query_x), state["support"], state["labels"], int(state["n_way"]))
