"""Prototypical networks (Snell et al., 2017): classify queries by distance to class-mean embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State
from pipeline.nn.fast import speed_up


def prototypes(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means of support embeddings.

    Args:
        support: embeddings of shape `(S, D)`.
        labels: episode-local labels in `0..n_way-1`, shape `(S,)`.
        n_way: number of classes N.

    Returns:
        Prototypes of shape `(N, D)`.
    """
    one_hot = F.one_hot(labels, n_way).to(support.dtype)  # (S, N)
    return (one_hot.T @ support) / one_hot.sum(0, keepdim=True).T


def proto_logits(query: Tensor, protos: Tensor, distance: str = "euclidean") -> Tensor:
    """Logits `(Q, N)`: negative squared Euclidean distance, or scaled cosine similarity, to each prototype."""
    if distance == "cosine":
        # A fixed temperature keeps the softmax from being flat on the unit sphere.
        return 10.0 * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
    return -torch.cdist(query, protos).pow(2)


class ProtoNet(FewShotMethod):
    """ProtoNet head over any encoder mapping `(B, C, *spatial)` to `(B, D)`."""

    def __init__(self, encoder: nn.Module, distance: str = "euclidean") -> None:
        super().__init__()
        self.encoder = speed_up(encoder)  # exact, faster pools (pipeline/nn/layers.py)
        self.distance = distance

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        """Logits of shape `(Q, N)` for queries `(Q, C, *spatial)` given support `(S, C, *spatial)`."""
        # One encoder pass over support and query keeps normalisation statistics consistent.
        z = self.encoder(torch.cat([support_x, query_x]))
        protos = prototypes(z[: len(support_x)], support_y, n_way)
        return proto_logits(z[len(support_x):], protos, self.distance)

    logits_for_training = forward

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        """`{"prototypes": (N, D)}` (detached)."""
        with torch.no_grad():
            return {"prototypes": prototypes(self.encoder(support_x), support_y, n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return proto_logits(self.encoder(query_x), state["prototypes"], self.distance)
