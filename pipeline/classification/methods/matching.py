"""Matching networks (Vinyals et al., 2016): attention over support items by cosine similarity.

Without the full-context (LSTM) embeddings of the paper: support and query are embedded independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State
from pipeline.nn.fast import speed_up


def matching_logits(query: Tensor, support: Tensor, support_y: Tensor, n_way: int, scale: float = 10.0) -> Tensor:
    """Log-probabilities `(Q, N)`: `log sum_i softmax_i(scale * cos(q, s_i)) * onehot(y_i)`.

    Args:
        query: embeddings `(Q, D)`; support: embeddings `(S, D)`; support_y: labels `(S,)` in `0..N-1`.
    """
    attention = torch.softmax(scale * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T, dim=-1)  # (Q, S)
    probs = attention @ F.one_hot(support_y, n_way).to(attention.dtype)  # (Q, N)
    return torch.log(probs.clamp_min(1e-8))


class MatchingNet(FewShotMethod):
    """Matching network over any encoder `(B, C, *spatial) -> (B, D)`; logits are log-probabilities."""

    def __init__(self, encoder: nn.Module, scale: float = 10.0) -> None:
        super().__init__()
        self.encoder, self.scale = speed_up(encoder), scale  # exact, faster pools (pipeline/nn/layers.py)

    def logits_for_training(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        z = self.encoder(torch.cat([support_x, query_x]))
        return matching_logits(z[len(support_x):], z[: len(support_x)], support_y, n_way, self.scale)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        return self.logits_for_training(support_x, support_y, query_x, n_way)

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        """Support embeddings `(S, D)` and labels `(S,)`."""
        with torch.no_grad():
            return {"support": self.encoder(support_x), "labels": support_y, "n_way": torch.tensor(n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return matching_logits(self.encoder(query_x), state["support"], state["labels"], int(state["n_way"]),
                               self.scale)
