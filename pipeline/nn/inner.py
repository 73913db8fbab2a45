"""Functional inner loop for gradient-based meta-learning, reusable over any `nn.Module` and any loss.

MAML, Meta-SGD and Reptile here, and the segmentation/registration learners elsewhere, all adapt a *dict* of
parameters rather than the module itself, so the module is never copied and the outer graph stays explicit:

    params = dict(model.named_parameters())           # the meta-parameters (leaves of the outer graph)
    def loss_fn(p):                                    # any scalar loss of the parameters
        return F.cross_entropy(call(model, p, support_x), support_y)
    fast = adapt(params, loss_fn, steps=5, lr=0.4)                       # second-order (differentiable)
    fast = adapt(params, loss_fn, steps=5, lr=0.4, first_order=True)     # first-order: no graph through grads
    fast = adapt(params, loss_fn, steps=5, lr=lrs)                       # Meta-SGD: lr is a dict of tensors
    fast = adapt(params, loss_fn, steps=5, lr=[lr0, lr1, ...])           # one step size per step (MAML++)
    for fast in adapt_steps(params, loss_fn, steps=5, lr=0.4): ...       # the weights after every step
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]
StepSize = float | Tensor | Mapping[str, Tensor]
# One step size for every step, or one per step (a list or tuple; steps past its end repeat its last entry).
Schedule = StepSize | Sequence[StepSize]
T = TypeVar("T")
R = TypeVar("R")


def call(model: nn.Module, params: Mapping[str, Tensor], *args: object, **kwargs: object) -> Tensor:
    """Run `model` with `params` substituted for its parameters (buffers are the module's own)."""
    return functional_call(model, dict(params), args, kwargs)


def _step_size(lr: StepSize, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def step_size_at(lr: Schedule, step: int) -> StepSize:
    """The step size of inner step `step` (from 0): a per-step list's entry (its last past its end), else `lr`."""
    if isinstance(lr, list | tuple):
        return lr[min(step, len(lr) - 1)]
    return lr


def adapt(params: Mapping[str, Tensor], loss_fn: LossFn, steps: int, lr: Schedule, first_order: bool = False,
          create_graph: bool | None = None) -> Params:
    """`steps` gradient steps `p <- p - lr * dL/dp` on `loss_fn`, differentiable w.r.t. the initial params.

    Args:
        params: name -> tensor, usually `dict(model.named_parameters())`; every entry is adapted.
        loss_fn: maps a params dict to a scalar loss (e.g. the support loss).
        steps: number of inner steps (0 returns `params` unchanged).
        lr: one step size, or a dict of per-parameter step sizes (scalars or tensors shaped like the params), or a
            list of either, one per step (see `Schedule`).
        first_order: drop the second-order terms (the inner gradients are treated as constants).
        create_graph: override; default `not first_order`. False with `first_order=False` is not meaningful.

    Returns:
        The adapted params, a new dict with the same keys and shapes.
    """
    fast = dict(params)
    for fast in adapt_steps(params, loss_fn, steps, lr, first_order, create_graph):  # noqa: B007 (the last one)
        pass
    return fast


def adapt_steps(params: Mapping[str, Tensor], loss_fn: LossFn, steps: int, lr: Schedule, first_order: bool = False,
                create_graph: bool | None = None) -> Iterator[Params]:
    """`adapt`, yielding the params after each of its `steps` steps (new dicts: a multi-step loss keeps them all).

    Keeping every step's weights costs no memory beyond `adapt`'s in second order: its graph holds them anyway.
    """
    create_graph = (not first_order) if create_graph is None else create_graph
    fast = dict(params)
    names = [n for n, p in fast.items() if p.requires_grad]
    for step in range(steps):
        step_lr = step_size_at(lr, step)
        loss = loss_fn(fast)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph, allow_unused=True)
        used = [(n, g if create_graph else g.detach()) for n, g in zip(names, grads, strict=True)
                if g is not None]  # None: a parameter this loss does not use (e.g. unused head columns)
        if used and isinstance(step_lr, float | int):  # (`_foreach_add` refuses an empty list)
            # one fused op (and one autograd node) for every parameter, instead of a multiply and a subtract each
            stepped = torch._foreach_add([fast[n] for n, _ in used], [g for _, g in used], alpha=-step_lr)
        else:
            stepped = [fast[n] - _step_size(step_lr, n) * g for n, g in used]
        fast = {**fast, **dict(zip([n for n, _ in used], stepped, strict=True))}
        yield fast


def adapt_inference(params: Mapping[str, Tensor], loss_fn: LossFn, steps: int, lr: Schedule) -> Params:
    """Evaluation-time adaptation that builds no outer graph: the starting params and step sizes are detached.

    Each step builds only the small graph of its own support loss, freed immediately, so memory does not grow
    with `steps` and nothing links the result to the meta-parameters. Works under `torch.no_grad()`.
    """
    fast = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        for step in range(steps):
            step_lr = _detached(step_size_at(lr, step))
            fast = {k: v.requires_grad_() for k, v in fast.items()}
            grads = torch.autograd.grad(loss_fn(fast), list(fast.values()), allow_unused=True)
            fast = {k: (v - _step_size(step_lr, k) * g).detach() if g is not None else v.detach()
                    for (k, v), g in zip(fast.items(), grads, strict=True)}
    return fast


def _detached(lr: StepSize) -> StepSize:
    """`lr` cut from the outer graph (a dict may mix numbers and tensors)."""
    if isinstance(lr, Mapping):
        return {k: _detached(v) for k, v in lr.items()}
    return lr.detach() if isinstance(lr, Tensor) else lr


def adapt_functional(params: Params, loss_fn: LossFn, steps: int, lr: Schedule, first_order: bool = False) -> Params:
    """The inner loop with `torch.func.grad` (composes with `torch.func.vmap`); same maths as `adapt`."""
    fast = dict(params)
    for fast in adapt_functional_steps(params, loss_fn, steps, lr, first_order):  # noqa: B007 (the last one)
        pass
    return fast


def adapt_functional_steps(params: Params, loss_fn: LossFn, steps: int, lr: Schedule,
                           first_order: bool = False) -> Iterator[Params]:
    """`adapt_functional`, yielding the params after each step (as `adapt_steps` does for `adapt`)."""
    fast = dict(params)
    for step in range(steps):
        step_lr = step_size_at(lr, step)
        grads = torch.func.grad(loss_fn)(fast)
        fast = {k: v - _step_size(step_lr, k) * (grads[k].detach() if first_order else grads[k])
                for k, v in fast.items()}
        yield fast


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


# --- Reptile's outer update ------------------------------------------------------------------------------------
@torch.no_grad()
def reptile_update(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor], meta_lr: float) -> None:
    """Reptile's outer update (Nichol et al., 2018), in place: `theta <- theta + meta_lr * (phi - theta)`.

    Args:
        theta: name -> tensor to move, e.g. `model.state_dict()` (weights and BatchNorm running statistics alike);
            non-float entries (counters such as `num_batches_tracked`) are copied from `phi`.
        phi: the adapted tensors, same names.
        meta_lr: the outer step (1: theta becomes phi, plain training).
    """
    for name, value in theta.items():
        if value.is_floating_point():
            value.add_(phi[name] - value, alpha=meta_lr)
        else:
            value.copy_(phi[name])


def reptile_loss(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor]) -> Tensor:
    """`reptile_update` as a loss, for meta-parameters an outer optimiser steps: `sum ||theta - phi||^2 / 2`.

    Its gradient is `theta - phi` (`phi` is detached), so an SGD step of size `meta_lr` is exactly
    `reptile_update(theta, phi, meta_lr)` (tested bitwise), a mean over the tasks of a meta-batch is batched
    Reptile, and any other optimiser (Adam) takes the same direction.
    """
    return sum(0.5 * (theta[k] - phi[k].detach()).pow(2).sum() for k in theta)


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


