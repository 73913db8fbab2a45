"""Exact, faster stand-ins for layers of a user's network; every few-shot method applies `speed_up` to its encoder.

Second-order MAML runs every layer forward, backward and backward-of-backward, 24 times per meta-iteration of the
Conv4 benchmark; on a CPU two of PyTorch's own choices cost more there than the convolutions' arithmetic would
suggest (measured with `torch.profiler`, `benchmarks/README.md`):

* `ReLU` then max-pool runs the ReLU, its backward and the tensor it saves at full resolution. Max-pooling commutes
  with ReLU, so `pool_before_relu` swaps the pair: same outputs, same gradients, a quarter of that work in 2D.
* The max-pool forward kernel for NCHW tensors is 2-3x slower than the channels-last one. `FastMaxPool` runs the
  forward channels-last and the backward with PyTorch's own NCHW kernel on the same indices, so values, chosen
  indices (ties included) and gradients of every order are PyTorch's.

Nothing here changes a parameter's name or value: checkpoints load either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

_MaxPool = nn.MaxPool2d | nn.MaxPool3d


class _ChannelsLastMaxPool(Function):
    """Max-pool forward through the channels-last kernel; backward = `max_pool{2,3}d_with_indices_backward`."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, pool: _MaxPool) -> Tensor:
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        fn = F.max_pool2d if x.ndim == 4 else F.max_pool3d
        y, idx = fn(x.contiguous(memory_format=fmt), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                    pool.ceil_mode, return_indices=True)
        ctx.save_for_backward(idx.contiguous())  # indices only: 1/4 of the input (2D), no copy of the input
        ctx.shape, ctx.pool = x.shape, pool
        return y.contiguous()

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        p, d = ctx.pool, len(ctx.shape) - 2
        # the kernel takes the input for its sizes only; an uninitialised tensor of that size is never read
        like = grad.new_empty(ctx.shape)
        op = (torch.ops.aten.max_pool2d_with_indices_backward if d == 2
              else torch.ops.aten.max_pool3d_with_indices_backward)
        # a differentiable op (its own backward gathers by the same indices): higher-order gradients work
        return op(grad, like, _tuple(p.kernel_size, d), _tuple(p.stride or p.kernel_size, d),
                  _tuple(p.padding, d), _tuple(p.dilation, d), p.ceil_mode, idx), None


def _tuple(v: int | tuple[int, ...], d: int) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v] * d


class FastMaxPool(nn.Module):
    """Drop-in for an `nn.MaxPool2d`/`nn.MaxPool3d` (without `return_indices`): identical values and gradients.

    On a CPU with NCHW/NCDHW inputs the forward runs channels-last (see the module docstring); elsewhere (CUDA,
    other layouts) it is the wrapped layer itself.
    """

    def __init__(self, pool: _MaxPool) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        # torch.func transforms (vmap, grad) need their own rules for a custom Function: plain layer there
        if x.device.type == "cpu" and x.ndim in (4, 5) and x.is_contiguous() \
                and not torch._C._functorch.is_functorch_wrapped_tensor(x):
            return _ChannelsLastMaxPool.apply(x, self.pool)
        return self.pool(x)


def pool_before_relu(module: nn.Module) -> int:
    """Swap, in place, every `nn.ReLU` directly followed by a max-pool (inside any `nn.Sequential`) into pool, ReLU.

    Max-pooling commutes with ReLU (a monotone function), and the gradients agree too: where a window's maximum is
    not positive both orders pass no gradient, elsewhere both route it to the same (first) maximum. So outputs and
    gradients are bitwise unchanged (tested), while the ReLU, its backward and the tensor it saves shrink to the
    pooled size (1/4 in 2D, 1/8 in 3D). Returns the number of pairs swapped.
    """
    swapped = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if type(seq[i]) is nn.ReLU and _is_plain_max_pool(seq[i + 1]):
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
                swapped += 1
    return swapped


def _is_plain_max_pool(m: nn.Module) -> bool:
    return isinstance(m, FastMaxPool) or (isinstance(m, nn.MaxPool2d | nn.MaxPool3d) and not m.return_indices)


def speed_up(module: nn.Module) -> nn.Module:
    """`pool_before_relu`, then each plain max-pool wrapped in `FastMaxPool`; in place, idempotent; returns `module`."""
    pool_before_relu(module)
    for parent in list(module.modules()):
        if isinstance(parent, FastMaxPool):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d | nn.MaxPool3d) and not child.return_indices:
                setattr(parent, name, FastMaxPool(child))
    return module
