"""Functional inner loop for gradient-based meta-learning, reusable over any `nn.Module` and any loss.

MAML, Meta-SGD and Reptile here, and the segmentation/registration learners elsewhere, all adapt a *dict* of
parameters rather than the module itself, so the module is never copied and the outer graph stays explicit:

    params = dict(model.named_parameters())           # the meta-parameters (leaves of the outer graph)
    def loss_fn(p):                                    # any scalar loss of the parameters
        return F.cross_entropy(call(model, p, support_x), support_y)
    fast = adapt(params, loss_fn, steps=5, lr=0.4)                       # second-order (differentiable)
    fast = adapt(params, loss_fn, steps=5, lr=0.4, first_order=True)     # first-order: no graph through grads
    fast = adapt(params, loss_fn, steps=5, lr=lrs)                       # Meta-SGD: lr is a dict of tensors
    fast = adapt_inference(params, loss_fn, steps=5, lr=0.4)             # evaluation: no outer graph at all
    query_loss = F.cross_entropy(call(model, fast, query_x), query_y)
    query_loss.backward()                              # meta-gradients land in model.parameters().grad

`call(model, params, *args)` is `torch.func.functional_call` with the module's buffers filled in.
`adapt` uses `torch.autograd.grad`; `create_graph` is True for second order (the step `p - lr * g` stays
differentiable in `p`, `g` and `lr`), False for first order (gradients are detached, so memory stays flat in the
number of steps; the fast weights still depend on `p` and on a learned `lr`). `adapt_functional` is the same loop
written with `torch.func.grad` so it composes with `torch.func.vmap` over the tasks of a meta-batch (see
`vmap_task_losses`); with BatchNorm in batch-statistics mode, vmap's second-order gradients are wrong on torch
2.13 (use GroupNorm, or the per-task loop), which `tests/test_maml.py` checks.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.layers import speed_up
from pipeline.methods.base import FewShotMethod, State, TaskOut
from pipeline.stem import StemSequential

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]
StepSize = float | Tensor | Mapping[str, Tensor]
T = TypeVar("T")
R = TypeVar("R")


def call(model: nn.Module, params: Mapping[str, Tensor], *args: object, **kwargs: object) -> Tensor:
    """Run `model` with `params` substituted for its parameters (buffers are the module's own)."""
    return functional_call(model, dict(params), args, kwargs)


def _step_size(lr: StepSize, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt(params: Mapping[str, Tensor], loss_fn: LossFn, steps: int, lr: StepSize, first_order: bool = False,
          create_graph: bool | None = None) -> Params:
    """`steps` gradient steps `p <- p - lr * dL/dp` on `loss_fn`, differentiable w.r.t. the initial params.

    Args:
        params: name -> tensor, usually `dict(model.named_parameters())`; every entry is adapted.
        loss_fn: maps a params dict to a scalar loss (e.g. the support loss).
        steps: number of inner steps (0 returns `params` unchanged).
        lr: one step size, or a dict of per-parameter step sizes (scalars or tensors shaped like the params).
        first_order: drop the second-order terms (the inner gradients are treated as constants).
        create_graph: override; default `not first_order`. False with `first_order=False` is not meaningful.

    Returns:
        The adapted params, a new dict with the same keys and shapes.
    """
    create_graph = (not first_order) if create_graph is None else create_graph
    fast = dict(params)
    names = [n for n, p in fast.items() if p.requires_grad]
    for _ in range(steps):
        loss = loss_fn(fast)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph, allow_unused=True)
        used = [(n, g if create_graph else g.detach()) for n, g in zip(names, grads, strict=True)
                if g is not None]  # None: a parameter this loss does not use (e.g. unused head columns)
        if used and isinstance(lr, float | int):  # (`_foreach_add` refuses an empty list)
            # one fused op (and one autograd node) for every parameter, instead of a multiply and a subtract each
            stepped = torch._foreach_add([fast[n] for n, _ in used], [g for _, g in used], alpha=-lr)
        else:
            stepped = [fast[n] - _step_size(lr, n) * g for n, g in used]
        fast.update(zip([n for n, _ in used], stepped, strict=True))
    return fast


def adapt_inference(params: Mapping[str, Tensor], loss_fn: LossFn, steps: int, lr: StepSize) -> Params:
    """Evaluation-time adaptation that builds no outer graph: the starting params and step sizes are detached.

    Each step builds only the small graph of its own support loss, freed immediately, so memory does not grow
    with `steps` and nothing links the result to the meta-parameters. Works under `torch.no_grad()`.
    """
    detached_lr = ({k: v.detach() for k, v in lr.items()} if isinstance(lr, Mapping)
                   else lr.detach() if isinstance(lr, Tensor) else lr)
    fast = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        for _ in range(steps):
            fast = {k: v.requires_grad_() for k, v in fast.items()}
            grads = torch.autograd.grad(loss_fn(fast), list(fast.values()), allow_unused=True)
            fast = {k: (v - _step_size(detached_lr, k) * g).detach() if g is not None else v.detach()
                    for (k, v), g in zip(fast.items(), grads, strict=True)}
    return fast


def adapt_functional(params: Params, loss_fn: LossFn, steps: int, lr: StepSize, first_order: bool = False) -> Params:
    """The inner loop with `torch.func.grad` (composes with `torch.func.vmap`); same maths as `adapt`."""
    fast = dict(params)
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(fast)
        fast = {k: v - _step_size(lr, k) * (grads[k].detach() if first_order else grads[k]) for k, v in fast.items()}
    return fast


def vmap_task_losses(task_loss: Callable[..., Tensor | tuple[Tensor, ...]], params: Params,
                     *task_batches: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Per-task losses `(T,)` of a meta-batch, vectorised over the leading task dimension of `task_batches`.

    `task_loss(params, *one_task_tensors) -> scalar` (or a tuple; every output gains a leading T) must adapt
    with `adapt_functional` (not `adapt`). Params
    are shared across tasks (not batched); the outer backward through the result gives meta-gradients.
    """
    # vmap cannot query channels-last strides (torch 2.13): standard strides, also where `.contiguous()` keeps a
    # 1-channel weight's channels-last ones (with one channel both layouts count as contiguous)
    params = {k: v.clone(memory_format=torch.contiguous_format) for k, v in params.items()}
    return torch.func.vmap(task_loss, in_dims=(None, *([0] * len(task_batches))))(params, *task_batches)


# --- tasks of a meta-batch in parallel threads ----------------------------------------------------------------
def replicate(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers *are* the original tensors (not copies).

    `functional_call` swaps tensors into the module it is given for the duration of the call, so two threads must
    not call it on one module; each thread gets a replica instead, and gradients still reach the original leaves.
    """
    replica = copy.deepcopy(model)
    for orig, rep in zip(model.modules(), replica.modules(), strict=True):
        rep._parameters.update(orig._parameters)
        rep._buffers.update(orig._buffers)
    return replica


def threaded_task_grads(model: nn.Module, tasks: Sequence[T], task_loss: Callable[[nn.Module, T], tuple[Tensor, R]],
                        threads: int) -> list[R]:
    """Accumulate `d task_loss / d params` of every task into `model`'s `.grad`, tasks run in `threads` threads.

    On a CPU the small convolutions of a few-shot task use a second core poorly from inside one operator; whole
    tasks in parallel (one intra-op thread each, set by the caller) keep every core busy. Each thread calls
    `torch.autograd.grad` on its own replica (see `replicate`), and the per-task gradients are summed in task
    order, so the result equals the sequential `loss.backward()` loop (tested) and does not depend on timing.
    Only for models whose forward mutates nothing shared (norm layers without running statistics, as MAML uses).

    Args:
        task_loss: `(replica, task) -> (scalar loss to differentiate, anything returned to the caller)`.

    Returns:
        The second outputs of `task_loss`, in task order.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    local = threading.local()

    def run(task: T) -> tuple[tuple[Tensor | None, ...], R]:
        if not hasattr(local, "replica"):
            local.replica = replicate(model)
        loss, extra = task_loss(local.replica, task)
        return torch.autograd.grad(loss, params, allow_unused=True), extra

    with ThreadPoolExecutor(max(1, min(threads, len(tasks)))) as pool:
        results = list(pool.map(run, tasks))
    for i, p in enumerate(params):
        for grads, _ in results:
            if grads[i] is not None:
                p.grad = grads[i].clone() if p.grad is None else p.grad + grads[i]
    return [extra for _, extra in results]


# --- MAML classifier --------------------------------------------------------------------------------------
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
            Default (None): on when `speed_up` fused the encoder's grayscale first block (`pipeline/layers.py`),
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
        speed_up(self.net)  # same function and gradients, less time and memory (pipeline/layers.py)
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
