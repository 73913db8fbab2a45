"""Reptile (Nichol et al., 2018): move the initialisation toward the weights adapted on each task."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.classification.methods.base import TaskOut
from pipeline.classification.methods.maml import MAML
from pipeline.nn.inner import adapt, reptile_loss


class Reptile(MAML):
    """Same network, inference path and normalisation policy as `MAML`; only the meta-update differs.

    Meta-training adapts first-order on the whole task (support and query together, `inner_steps` SGD steps) and
    returns Reptile's outer update as a loss (`reptile_loss`, gradient `theta - phi`): the outer optimiser moves
    `theta` toward the adapted `phi` (SGD with lr `eps` is exactly `reptile_update`'s `theta += eps (phi - theta)`;
    averaging over a meta-batch gives batched Reptile).
    """

    vmap_task_losses = None  # MAML's vectorised path computes MAML's query loss, not Reptile's

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        params = self.params()
        x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        phi = adapt(params, self.support_loss(x, y, n_way), self.inner_steps, self.inner_lr, first_order=True)
        loss = reptile_loss(params, phi)
        with torch.no_grad():
            # Monitoring only: query logits after adapting on the support alone, as at evaluation.
            logits = self.predict(self.fit(support_x, support_y, n_way), query_x)
        return TaskOut(loss, logits)
