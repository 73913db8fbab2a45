"""MAML (second or first order) over any encoder, on the functional inner loop of `pipeline/nn/inner.py`.

Meta-SGD (`metasgd.py`) and Reptile (`reptile.py`) are small subclasses. On a CPU, the tasks of a meta-batch can
run in threads (`method.task_threads`, bitwise the gradients of the sequential loop) or under `torch.func.vmap`
(`method.vmap`; exact with GroupNorm only, see `pipeline/nn/inner.py`).

Options of MAML++ (Antoniou et al., 2019) and ANIL (Raghu et al., 2020), all off by default:
- `per_step_lr`: a learned step size per inner step and parameter tensor (MAML++'s LSLR), stored like Meta-SGD's
  per-element ones (`learned_step_sizes`) and trained by the outer optimiser;
- `multi_step_loss`: the query loss after every inner step, weighted by `msl_weights` (MAML++'s MSL), which move
  from uniform to the last step alone over the first `msl_iterations` meta-iterations (`meta_iteration`, set by
  the training loop);
- `adapt_head`: only the linear head adapts in the inner loop (ANIL); the encoder runs once per task and its
  features serve every inner step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.classification.methods.base import FewShotMethod, State, TaskOut
from pipeline.nn.fast import speed_up
from pipeline.nn.inner import (
    LossFn,
    Params,
    Schedule,
    adapt_functional_steps,
    adapt_inference,
    adapt_steps,
    call,
    vmap_task_losses,
)
from pipeline.nn.stem import StemSequential

HEAD = "1."  # names of the linear head's parameters in `MAML.net = Sequential(encoder, head)`


def learned_step_sizes(params: Mapping[str, Tensor], init: float, steps: int | None = None) -> nn.ParameterList:
    """Meta-learned inner step sizes, one tensor per entry of `params` (in its order), every value `init`.

    Args:
        params: the adapted parameters, name -> tensor.
        init: the initial step size.
        steps: None: each tensor shaped like its parameter (Meta-SGD, per element); an int: each `(steps,)`, one
            scalar per inner step and parameter tensor (MAML++'s per-layer, per-step rates).
    """
    return nn.ParameterList([nn.Parameter(torch.full_like(p, init) if steps is None else p.new_full((steps,), init))
                             for p in params.values()])


def msl_weights(steps: int, iteration: int, anneal: int) -> list[float]:
    """MAML++'s multi-step loss weights of the query losses after inner steps `1..steps`; they sum to 1.

    Uniform at iteration 0, they move linearly to the last step alone, reached at iteration `anneal` (MAML++ keeps
    a small floor on the early steps; here they reach 0, so training goes on as plain MAML, with no wasted query
    passes).

    Returns:
        `steps` floats (empty for 0 steps).
    """
    if steps == 0:
        return []
    done = min(iteration / anneal, 1.0)
    early = (1.0 - done) / steps
    return [early] * (steps - 1) + [early + done]


class MAML(FewShotMethod):
    """MAML (Finn et al., 2017) over `encoder` + a linear head of `max_ways` outputs (the first N are used).

    Every parameter is adapted in the inner loop (the head alone with `adapt_head`). Normalisation policy: the
    encoder's norm layers run with batch statistics at every inner step and at query time (BatchNorm built with
    `track_running_stats=False`, or GroupNorm/InstanceNorm), so train and evaluation behave identically and no
    running buffers are mutated inside the functional calls.

    Args:
        encoder: maps `(B, C, *spatial)` to `(B, D)` with `encoder.out_dim == D`.
        max_ways: head width (the largest N used in training or evaluation).
        inner_steps, inner_lr: inner loop during meta-training.
        first_order: drop second-order terms (memory flat in `inner_steps`).
        eval_steps: inner steps at evaluation (default `inner_steps`); with `per_step_lr`, steps past
            `inner_steps` use the last step's learned sizes.
        channels_last: for 2D conv encoders, keep weights and images channels-last (NHWC). Same results (tested).
            Default (None): on when `speed_up` fused the encoder's grayscale first block (`pipeline/nn/layers.py`),
            whose output is channels-last, so every later convolution would otherwise convert its weight at each
            call (0.88x the meta-iteration time in an A/B on the Conv4 benchmark); off otherwise, where it measured
            no faster (0.98-1.14x).
        per_step_lr, multi_step_loss, msl_iterations, adapt_head: the MAML++ and ANIL options (module docstring).
    """

    # Task losses mutate no shared state (functional inner loop, no running statistics): `threaded_task_grads` may
    # run the tasks of a meta-batch in parallel threads (`method.task_threads`).
    parallel_tasks = True

    def __init__(self, encoder: nn.Module, max_ways: int, inner_steps: int = 5, inner_lr: float = 0.4,
                 first_order: bool = False, eval_steps: int | None = None,
                 channels_last: bool | None = None, *, per_step_lr: bool = False, multi_step_loss: bool = False,
                 msl_iterations: int = 100, adapt_head: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(encoder, nn.Linear(encoder.out_dim, max_ways))
        speed_up(self.net)  # same function and gradients, less time and memory (pipeline/nn/layers.py)
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.eval_steps = inner_steps if eval_steps is None else eval_steps
        self.multi_step_loss, self.msl_iterations, self.adapt_head = multi_step_loss, msl_iterations, adapt_head
        if channels_last is None:
            channels_last = any(isinstance(m, StemSequential) for m in self.net.modules())
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)  # 4D conv weights only; the head is unchanged
        # the names the inner loop adapts, in `named_parameters()` order
        self.inner_names = [n for n, _ in self.net.named_parameters() if not adapt_head or n.startswith(HEAD)]
        self.lrs: nn.ParameterList | None = None
        if per_step_lr:
            self.lrs = learned_step_sizes(self._inner(self.params()), inner_lr, max(inner_steps, 1))

    def layout(self, x: Tensor) -> Tensor:
        """Images `(B, C, H, W)` in the encoder's memory format (values unchanged)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def step_sizes(self) -> Schedule:
        """The inner step size(s): `inner_lr`, or with `per_step_lr` one `{name: scalar}` per inner step; Meta-SGD
        overrides this with learned per-element tensors."""
        if self.lrs is None:
            return self.inner_lr
        return [{n: lr[s] for n, lr in zip(self.inner_names, self.lrs, strict=True)} for s in range(len(self.lrs[0]))]

    def params(self) -> Params:
        return dict(self.net.named_parameters())

    def logits(self, params: Mapping[str, Tensor], x: Tensor, n_way: int, layout: bool = True) -> Tensor:
        return call(self.net, params, self.layout(x) if layout else x)[:, :n_way]

    def support_loss(self, x: Tensor, y: Tensor, n_way: int, layout: bool = True) -> LossFn:
        return lambda p: F.cross_entropy(self.logits(p, x, n_way, layout), y)

    # --- what the inner loop sees: the whole network on images, or (ANIL) the head on encoder features --------
    def _inner(self, params: Mapping[str, Tensor]) -> Params:
        return {n: params[n] for n in self.inner_names}

    def inner_input(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Images `x` (laid out) as the inner loop takes them: unchanged, or encoder features `(B, D)` (ANIL)."""
        if not self.adapt_head:
            return x
        encoder = {n[2:]: v for n, v in params.items() if n.startswith("0.")}
        return call(self.net[0], encoder, x)

    def inner_logits(self, params: Mapping[str, Tensor], z: Tensor, n_way: int) -> Tensor:
        """Logits `(B, N)` of inner inputs `z` (`inner_input`) under `params`, the full set or the adapted ones."""
        if not self.adapt_head:
            return self.logits(params, z, n_way, layout=False)
        return F.linear(z, params[HEAD + "weight"], params[HEAD + "bias"])[:, :n_way]  # as the full network

    # --- inference --------------------------------------------------------------------------------------------
    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> State:
        """Adapted weights (all of them, the encoder's unchanged under ANIL) plus `n_way` (no outer graph)."""
        params = {k: v.detach() for k, v in self.params().items()}
        with torch.no_grad():
            zs = self.inner_input(params, self.layout(support_x))
        fast = adapt_inference(self._inner(params), lambda p: F.cross_entropy(self.inner_logits(p, zs, n_way),
                                                                              support_y),
                               self.eval_steps, self.step_sizes())
        return {**params, **fast, "n_way": torch.tensor(n_way)}

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        return self.logits({k: v for k, v in state.items() if k != "n_way"}, query_x, int(state["n_way"]))

    # --- meta-training ----------------------------------------------------------------------------------------
    def query_loss(self, params: Params, lr: Schedule, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, n_way: int,
                   functional: bool = False) -> tuple[Tensor, Tensor]:
        """One task's meta-loss and its query logits `(Q, N)` after the last inner step.

        Args:
            params: the meta-parameters; lr: `step_sizes()`.
            sx, sy, qx, qy: support `(S, C, *spatial)` and query images (laid out) with their labels.
            functional: adapt with `torch.func.grad` (under `vmap`) rather than `torch.autograd.grad`.
        """
        zs, zq = self.inner_input(params, sx), self.inner_input(params, qx)  # once per task under ANIL

        def support(p: Params) -> Tensor:
            return F.cross_entropy(self.inner_logits(p, zs, n_way), sy)

        inner = params if not self.adapt_head else self._inner(params)
        stepper = adapt_functional_steps if functional else adapt_steps
        weights = msl_weights(self.inner_steps, self.meta_iteration, self.msl_iterations) if self.multi_step_loss \
            else []
        fast, early = inner, []
        for step, fast in enumerate(stepper(inner, support, self.inner_steps, lr, self.first_order)):
            if step < len(weights) - 1 and weights[step] > 0:  # MSL's earlier steps; annealed to 0: no query pass
                early.append(weights[step] * F.cross_entropy(self.inner_logits(fast, zq, n_way), qy))
        logits = self.inner_logits(fast, zq, n_way)
        loss = F.cross_entropy(logits, qy)
        if weights:
            loss = sum(early, weights[-1] * loss)
        return loss, logits

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
                  classes: Tensor | None = None) -> TaskOut:
        loss, logits = self.query_loss(self.params(), self.step_sizes(), self.layout(support_x), support_y,
                                       self.layout(query_x), query_y, n_way)
        return TaskOut(loss, logits)

    def vmap_task_losses(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                         n_way: int) -> tuple[Tensor, Tensor]:
        """Query losses `(T,)` and logits `(T, Q, N)` of T same-shaped tasks (leading dim), via `torch.func.vmap`."""
        lr = self.step_sizes()
        # vmap cannot query channels-last strides yet (torch 2.13): plain layout copies of step sizes and inputs
        if isinstance(lr, Mapping):
            lr = {k: v.contiguous() for k, v in lr.items()}

        def one(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self.query_loss(p, lr, sx, sy, qx, qy, n_way, functional=True)

        return vmap_task_losses(one, self.params(), support_x.contiguous(), support_y, query_x.contiguous(), query_y)
