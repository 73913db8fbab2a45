"""Faster stand-ins for single layers: a channels-last max-pool and batch norm with a closed-form double backward.

`pipeline/nn/fast.py` (`speed_up`) explains why they exist and applies them, with `pipeline/nn/stem.py`'s fused
first block, to every few-shot method's encoder. Each is PyTorch's function, tested at every order of gradient.
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


# --- batch norm with batch statistics: a lean double backward ----------------------------------------------------
class _BatchNormBackward(Function):
    """`native_batch_norm_backward` as a differentiable op whose own backward is the closed form below.

    PyTorch's double backward for batch norm is a chain of ~40 small tensor ops (3.4 ms a call in the Conv4 MAML
    benchmark, 19% of its time); this one makes 11 passes over the activation. Derivation, per channel with
    M values, xh = (x - mean) * r, r = 1/sqrt(var + eps), backward outputs gx = w r (g - <g> - xh <g xh>),
    gw = sum(g xh), gb = sum(g), and incoming gradients a (for gx), aw, ab; <.> is the channel mean:
        d/dg = w r (a - <a> - xh <a xh>) + aw xh + ab
        d/dw = r M (<a g> - <g><a> - <g xh><a xh>)
        d/dx = c1 g + c2 a + c3 xh + c4, with c1 = aw r - w r^2 <a xh>, c2 = -w r^2 <g xh>,
               c3 = -w r^2 (<a g> - <g><a> - 3 <g xh><a xh>) - aw r <g xh>,
               c4 = w r^2 (<a xh><g> + <g xh><a>) - aw r <g>
    (using d xh_j / d x_i = r (delta_ij - 1/M - xh_i xh_j / M) and d r / d x_i = -r^2 xh_i / M). Tested against
    PyTorch's double backward and by `gradgradcheck`; built from differentiable ops, so third order works too.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, g: Tensor, x: Tensor, w: Tensor, mean: Tensor, invstd: Tensor, eps: float,
                need_x: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps,
                                                               [need_x, True, True])
        ctx.save_for_backward(g, x, w, mean, invstd, gw, gb)
        ctx.set_materialize_grads(False)
        return gx, gw, gb

    @staticmethod
    def backward(ctx: FunctionCtx, a: Tensor | None, aw: Tensor | None, ab: Tensor | None) -> tuple[Tensor | None, ...]:
        g, x, w, mean, invstd, sum_gxh, sum_g = ctx.saved_tensors
        shape, dims = [1, -1] + [1] * (x.ndim - 2), [0, *range(2, x.ndim)]
        m = x.numel() // x.shape[1]
        r, wr = invstd.view(shape), (w * invstd).view(shape)
        xh = (x - mean.view(shape)) * r
        mg, mgx = (sum_g / m).view(shape), (sum_gxh / m).view(shape)
        aw = torch.zeros_like(r) if aw is None else aw.view(shape)
        ab = torch.zeros_like(r) if ab is None else ab.view(shape)
        if a is None:  # only gw and gb were used: they are linear in g and depend on x through xh alone
            return ((xh * aw + ab) if ctx.needs_input_grad[0] else None,
                    (aw * r * (g - mg - mgx * xh)) if ctx.needs_input_grad[1] else None, None, None, None, None, None)
        ma, maxh, mag = (a.sum(dims, keepdim=True) / m, (a * xh).sum(dims, keepdim=True) / m,
                         (a * g).sum(dims, keepdim=True) / m)
        d_g = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_g = torch.addcmul(ab - wr * ma, a, wr).addcmul_(xh, aw - wr * maxh)
        if ctx.needs_input_grad[1]:
            wr2 = wr * r
            c1, c2 = aw * r - wr2 * maxh, -wr2 * mgx
            c3 = -wr2 * (mag - mg * ma - 3 * mgx * maxh) - aw * r * mgx
            c4 = wr2 * (maxh * mg + mgx * ma) - aw * r * mg
            d_x = torch.addcmul(c4, g, c1).addcmul_(a, c2).addcmul_(xh, c3)
        if ctx.needs_input_grad[2]:
            d_w = (r * m * (mag - mg * ma - mgx * maxh)).view(-1)
        return d_g, d_x, d_w, None, None, None, None


class _BatchNormBatchStats(Function):
    """Training-mode batch norm without running statistics: PyTorch's kernels forward and backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, Tensor, Tensor, None]:
        x, w, mean, invstd = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a backward that builds no graph (no create_graph): the kernel itself
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, ctx.eps,
                                                                   [ctx.needs_input_grad[0], True, True])
        else:
            gx, gw, gb = _BatchNormBackward.apply(g, x, w, mean, invstd, ctx.eps, ctx.needs_input_grad[0])
        return gx, gw, gb, None


def _fast_batch_norm_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    if x.device.type == "cpu" and self.running_mean is None and self.affine and torch.is_grad_enabled() \
            and not torch._C._functorch.is_functorch_wrapped_tensor(x):
        self._check_input_dim(x)
        return _BatchNormBatchStats.apply(x, self.weight, self.bias, self.eps)
    return super(type(self), self).forward(x)


class FastBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose double backward is `_BatchNormBackward`'s (batch statistics, affine, on a CPU)."""

    forward = _fast_batch_norm_forward


class FastBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose double backward is `_BatchNormBackward`'s (batch statistics, affine, on a CPU)."""

    forward = _fast_batch_norm_forward


class FastBatchNorm3d(nn.BatchNorm3d):
    """`nn.BatchNorm3d` whose double backward is `_BatchNormBackward`'s (batch statistics, affine, on a CPU)."""

    forward = _fast_batch_norm_forward


_FAST_BN: dict[type, type] = {nn.BatchNorm1d: FastBatchNorm1d, nn.BatchNorm2d: FastBatchNorm2d,
                              nn.BatchNorm3d: FastBatchNorm3d}


