"""MAML (second or first order) over any encoder, on the functional inner loop of `pipeline/nn/inner.py`.

Meta-SGD (`metasgd.py`) and Reptile (`reptile.py`) are small subclasses. On a CPU, the tasks of a meta-batch can
run in threads (`method.task_threads`, bitwise the gradients of the sequential loop) or under `torch.func.vmap`
(`method.vmap`; exact with GroupNorm only, see `pipeline/nn/inner.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State, TaskOut
from pipeline.nn.fast import speed_up
from pipeline.nn.inner import LossFn, Params, StepSize, adapt, adapt_functional, adapt_inference, call, vmap_task_losses
from pipeline.nn.stem import StemSequential


class MAML(FewShotMethod):
    """MAML (Finn et al., 2017) over `encoder` + a linear head of `max_ways` outputs (the first N are used).

    Every parameter is adapted in the inner loop. Normalisation policy: the encoder's norm layers run with
    batch statistics at every inner step and at query time (BatchNorm built with `track_running_stats=False`,
    or GroupNorm/InstanceNorm), so train and evaluation behave identically and no running buffers are mutated
    inside the functional calls.

    Args:
        encoder: maps `(B, C, *spatial)` to `(B, D)` with `encoder.out_dim == D`.
        max_ways: head width (the largest N used in training or evaluation).
        inner_steps, inner_lr: inner loop during meta-training.
        first_order: drop second-order terms (memory flat in `inner_steps`).
        eval_steps: inner steps at evaluation (default `inner_steps`).
        channels_last: for 2D conv encoders, keep weights and images channels-last (NHWC). Same results (tested).
            Default (None): on when `speed_up` fused the encoder's grayscale first block (`pipeline/nn/layers.py`),
            whose output is channels-last, so every later convolution would otherwise convert its weight at each
            call (0.88x the meta-iteration time in an A/B on the Conv4 benchmark); off otherwise, where it measured
            no faster (0.98-1.14x).
    """

    # Task losses mutate no shared state (functional inner loop, no running statistics): `threaded_task_grads` may
    # run the tasks of a meta-batch in parallel threads (`method.task_threads`).
    parallel_tasks = True

    def __init__(self, encoder: nn.Module, max_ways: int, inner_steps: int = 5, inner_lr: float = 0.4,
                 first_order: bool = False, eval_steps: int | None = None,
                 channels_last: bool | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(encoder, nn.Linear(encoder.out_dim, max_ways))
        speed_up(self.net)  # same function and gradients, less time and memory (pipeline/nn/layers.py)
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.eval_steps = inner_steps if eval_steps is None else eval_steps
        if channels_last is None:
            channels_last = any(isinstance(m, StemSequential) for m in self.net.modules())
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)  # 4D conv weights only; the head is unchanged

    def layout(self, x: Tensor) -> Tensor:
        """Images `(B, C, H, W)` in the encoder's memory format (values unchanged)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def step_sizes(self) -> StepSize:
        """The inner step size(s); Meta-SGD overrides this with learned per-parameter tensors."""
        return self.inner_lr

    def params(self) -> Params:
        return dict(self.net.named_parameters())

    def logits(self, params: Mapping[str, Tensor], x: Tensor, n_way: int, layout: bool = True) -> Tensor:
        return call(self.net, params, self.layout(x) if layout else x)[:, :n_way]

    def support_loss(self, x: Tensor, y: Tensor, n_way: int, layout: bool = True) -> LossFn:
        return lambda p: F.cross_entropy(self.logits(p, x, n_way, layout), y)

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        """Adapted weights plus `n_way` (inference path: no outer graph)."""
        fast = adapt_inference(self.params(), self.support_loss(self.layout(support_x), support_y, n_way),
                               self.eval_steps,
                               self.step_sizes())
        return {**fast, "n_way": torch.tensor(n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return self.logits({k: v for k, v in state.items() if k != "n_way"}, query_x, int(state["n_way"]))

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        support_x, query_x = self.layout(support_x), self.layout(query_x)  # once, not at every inner step
        fast = adapt(self.params(), self.support_loss(support_x, support_y, n_way), self.inner_steps,
                     self.step_sizes(), self.first_order)
        logits = self.logits(fast, query_x, n_way)
        return TaskOut(F.cross_entropy(logits, query_y), logits)

    def vmap_task_losses(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                         n_way: int) -> tuple[Tensor, Tensor]:
        """Query losses `(T,)` and logits `(T, Q, N)` of T same-shaped tasks (leading dim), via `torch.func.vmap`."""
        lr = self.step_sizes()

        def one(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            fast = adapt_functional(p, self.support_loss(sx, sy, n_way, layout=False), self.inner_steps, lr,
                                    self.first_order)
            logits = self.logits(fast, qx, n_way, layout=False)
            return F.cross_entropy(logits, qy), logits

        # vmap cannot query channels-last strides yet (torch 2.13): plain layout copies of step sizes and inputs
        if isinstance(lr, Mapping):
            lr = {k: v.contiguous() for k, v in lr.items()}
        return vmap_task_losses(one, self.params(), support_x.contiguous(), support_y, query_x.contiguous(), query_y)
