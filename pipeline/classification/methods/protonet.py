"""Prototypical networks (Snell et al., 2017): classify queries by distance to class-mean embeddings.

Options: `normalize` L2-normalises the embeddings before prototypes and distances (as Meta-Baseline and cosine
classifiers do), and `temperature` scales the logits, fixed or meta-learned (a scalar saved with the weights, so
evaluate, adapt and predict all use the trained value).
"""

from __future__ import annotations

import math

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


def proto_logits(query: Tensor, protos: Tensor, distance: str = "euclidean", scale: float | Tensor | None = None,
                 ) -> Tensor:
    """Logits `(Q, N)` of queries `(Q, D)` against prototypes `(N, D)`: `scale` times the negative squared Euclidean
    distance, or times the cosine similarity.

    Args:
        scale: the logit scale; None: 10 for cosine (a fixed temperature keeps the softmax from being flat on the
            unit sphere), none (1) for Euclidean.
    """
    if distance == "cosine":
        return (10.0 if scale is None else scale) * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
    logits = -torch.cdist(query, protos).pow(2)
    return logits if scale is None else scale * logits


def default_scale(distance: str, normalize: bool) -> float:
    """The starting logit scale: 10 for cosine, 5 for Euclidean between unit vectors (`-|a - b|^2 = 2 cos - 2`, the
    same softmax as cosine at 10), 1 for plain Euclidean (the original ProtoNet)."""
    if distance == "cosine":
        return 10.0
    return 5.0 if normalize else 1.0


class ProtoNet(FewShotMethod):
    """ProtoNet head over any encoder mapping `(B, C, *spatial)` to `(B, D)`.

    Args:
        encoder: the embedding network.
        distance: `euclidean` (squared) or `cosine`.
        temperature: the logit scale: None (`default_scale`), a positive number, or `learn`: a meta-learned
            scalar starting at `default_scale`, stored as its logarithm (`log_scale`, so it stays positive).
        normalize: L2-normalise embeddings before the prototypes are formed.
    """

    def __init__(self, encoder: nn.Module, distance: str = "euclidean", temperature: float | str | None = None,
                 normalize: bool = False) -> None:
        super().__init__()
        self.encoder = speed_up(encoder)  # exact, faster pools (pipeline/nn/layers.py)
        self.distance, self.normalize = distance, normalize
        self.log_scale: nn.Parameter | None = None
        self.fixed_scale: float | None = None
        if temperature == "learn":
            self.log_scale = nn.Parameter(torch.tensor(math.log(default_scale(distance, normalize))))
        elif temperature is not None:
            self.fixed_scale = float(temperature)
        elif normalize:  # a new option: its default scale needs no backward compatibility with `None`
            self.fixed_scale = default_scale(distance, normalize)

    def scale(self) -> Tensor | float | None:
        """The logit scale in use (None: `proto_logits`'s default, as before the option existed)."""
        return self.log_scale.exp() if self.log_scale is not None else self.fixed_scale

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings `(B, D)` of images `(B, C, *spatial)`, unit-length with `normalize`."""
        z = self.encoder(x)
        return F.normalize(z, dim=-1) if self.normalize else z

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        """Logits of shape `(Q, N)` for queries `(Q, C, *spatial)` given support `(S, C, *spatial)`."""
        # One encoder pass over support and query keeps normalisation statistics consistent.
        z = self.embed(torch.cat([support_x, query_x]))
        protos = prototypes(z[: len(support_x)], support_y, n_way)
        return proto_logits(z[len(support_x):], protos, self.distance, self.scale())

    logits_for_training = forward

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        """`{"prototypes": (N, D)}` (detached)."""
        with torch.no_grad():
            return {"prototypes": prototypes(self.embed(support_x), support_y, n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return proto_logits(self.embed(query_x), state["prototypes"], self.distance, self.scale())
