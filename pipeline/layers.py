"""Faster stand-ins for layers of a user's network; every few-shot method applies `speed_up` to its encoder.

Second-order MAML runs every layer forward, backward and backward-of-backward, 24 times per meta-iteration of the
Conv4 benchmark; on a CPU three of PyTorch's own choices cost more there than the convolutions' arithmetic would
suggest (measured with `torch.profiler`, `benchmarks/README.md`):

* `ReLU` then max-pool runs the ReLU, its backward and the tensor it saves at full resolution. Max-pooling commutes
  with ReLU, so `pool_before_relu` swaps the pair: same outputs, same gradients, a quarter of that work in 2D.
* The max-pool forward kernel for NCHW tensors is 2-3x slower than the channels-last one. `FastMaxPool` runs the
  forward channels-last and the backward with PyTorch's own NCHW kernel on the same indices, so values, chosen
  indices (ties included) and gradients of every order are PyTorch's.
* Batch norm's double backward is a chain of ~40 small ops (3.4 ms a call). `FastBatchNorm*` keeps PyTorch's
  forward and backward kernels and replaces only that double backward with a closed form of 11 passes.
* A grayscale network's first block (1-channel conv, norm, max-pool) spends its time moving a 64x wider
  activation than its input through memory, several times over. `conv_norm_pool` computes the block without
  ever holding that activation whole (PyTorch's layers make five such tensors; see its docstring).

Nothing here changes a parameter's name or value (checkpoints load either way). The pool and batch-norm rewrites
leave outputs and first-order gradients bitwise unchanged and second-order gradients through batch norm equal to
rounding; the fused first block is equal to rounding at every order (tested in float64).
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


# --- the first block of a grayscale network, fused ----------------------------------------------------------------
_Norm = nn.BatchNorm2d | nn.GroupNorm | nn.InstanceNorm2d


def conv_norm_pool(x: Tensor, conv: nn.Conv2d, norm: _Norm, pool: nn.MaxPool2d) -> Tensor:
    """`pool(norm(conv(x)))` for a 1-channel conv, a norm with positive weights and a max-pool, fused.

    `norm` is a batch norm with batch statistics, a group norm, or an instance norm without running statistics,
    each with affine parameters. The same function, computed without a full-resolution tensor of the whole batch
    where PyTorch makes five (conv output, normalised copy, layout copy, and their gradients), because:

    * with one input channel the conv is a `(H*W, kh*kw) @ (kh*kw, C)` product per image, written channels-last so
      the fast max-pool kernel reads it in place (oneDNN runs this shape at a few GFLOP/s), and `_ConvPool` makes
      and pools it about 1 MB of images at a time, so only pooled values and indices outlive a chunk;
    * the mean and variance of `y = W cols + b` over any set of pixels follow from the `kh*kw` mean and covariance
      of those pixels' patches, without a pass over `y`: `m_c = w_c . mu + b_c` and `v_c = w_c' S w_c`, over the
      whole batch for batch norm, per image for instance norm, and per image then by the law of total variance
      over the channels of a group for group norm;
    * with a positive scale `weight_c / std` the normalisation is increasing in `y`, so it commutes with
      max-pooling and runs on the pooled tensor (1/4 of the size for a 2x2 pool).

    Gradients of every order are autograd's through these ops. Ties inside a pool window go to the first maximum,
    as in PyTorch; only a tie that PyTorch's rounding of the normalised values creates could route differently.

    Args:
        x: images `(N, 1, H, W)`.

    Returns:
        `(N, C, H', W')` in channels-last memory layout (values as `pool(norm(conv(x)))`; later convolutions and
        pools take that layout as it is).
    """
    n, c = x.shape[0], conv.out_channels
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = conv.kernel_size, conv.padding, conv.stride, conv.dilation
    h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, kh*kw, h*w)
    weight = conv.weight.reshape(c, -1)  # (C, kh*kw)
    if isinstance(norm, nn.GroupNorm | nn.InstanceNorm2d):  # statistics per image: each image's patch moments
        mu = cols.mean(2)  # (N, kh*kw)
        centred = cols - mu[:, :, None]
        cov = centred @ centred.transpose(1, 2) / cols.shape[2]  # (N, kh*kw, kh*kw)
        means = mu @ weight.T  # (N, C): each image's channel means
        if conv.bias is not None:
            means = means + conv.bias
        variances = ((cov @ weight.T) * weight.T).sum(1)  # (N, C): each image's channel variances
        if isinstance(norm, nn.GroupNorm):  # over the channels of each group
            groups = (n, norm.num_groups, c // norm.num_groups)
            m, v = means.view(groups), variances.view(groups)
            mean = m.mean(2, keepdim=True)
            var = (v.mean(2, keepdim=True) + (m - mean).pow(2).mean(2, keepdim=True)).expand(groups).reshape(n, c)
            mean = mean.expand(groups).reshape(n, c)
        else:  # instance norm: per image and channel
            mean, var = means, variances
    else:  # batch norm: per channel over every patch of the batch, from their mean and covariance
        mu = cols.mean((0, 2))  # (kh*kw,)
        centred = cols - mu[None, :, None]
        cov = (centred @ centred.transpose(1, 2)).sum(0) / (n * cols.shape[2])  # (kh*kw, kh*kw)
        mean = (weight @ mu)[None]  # (1, C)
        if conv.bias is not None:
            mean = mean + conv.bias
        var = ((weight @ cov) * weight).sum(1, keepdim=True).T  # (1, C)
    pooled = _ConvPool.apply(cols, weight, conv.bias, (h, w), pool)
    scale = norm.weight * torch.rsqrt(var + norm.eps)  # (1 or N, C)
    return torch.addcmul((norm.bias - mean * scale)[:, :, None, None], pooled, scale[:, :, None, None])


_CHUNK_BYTES = 1 << 20  # conv output per chunk: fits in L2 and in glibc's reused heap (no fresh pages per call)


class _ConvPool(Function):
    """`max_pool(y)` for the 1-channel conv `y_n = cols_n^T W^T (+ b)`, a few images at a time.

    The full-resolution conv output (64x the input) never exists whole: each chunk's is pooled while it is still
    in cache, and only the pooled values and their indices are kept (PyTorch's max-pool would also keep `y` for its
    backward). The backward routes the pooled gradient back chunk by chunk and contracts it with `cols` at once.
    Both passes are made of differentiable ops, so second-order gradients are autograd's through them.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, cols: Tensor, weight: Tensor, bias: Tensor | None, hw: tuple[int, int],
                pool: nn.MaxPool2d) -> Tensor:
        n, c = cols.shape[0], weight.shape[0]
        step = max(1, _CHUNK_BYTES // (cols.shape[2] * c * cols.element_size()))
        outs, idxs = [], []
        for s in range(0, n, step):
            part = cols[s:s + step]
            y = torch.bmm(part.transpose(1, 2), weight.T.expand(part.shape[0], -1, -1))
            y = y.view(-1, *hw, c).permute(0, 3, 1, 2)  # (n', h*w, C) as channels-last (n', C, h, w): fast pool
            out, idx = F.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                    return_indices=True)
            if bias is not None:  # max(y + b) = max(y) + b: the bias on the pooled values, a quarter of y
                out += bias.view(1, -1, 1, 1)
            outs.append(out)
            idxs.append(idx)
        ctx.save_for_backward(cols, weight, *idxs)
        ctx.hw, ctx.pool, ctx.step = hw, pool, step
        return torch.cat(outs).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        cols, weight, *idxs = ctx.saved_tensors
        p, (h, w), c = ctx.pool, ctx.hw, weight.shape[0]
        args = (_tuple(p.kernel_size, 2), _tuple(p.stride or p.kernel_size, 2), _tuple(p.padding, 2),
                _tuple(p.dilation, 2), p.ceil_mode)
        g_cols, g_w = [], None
        for s, idx in zip(range(0, cols.shape[0], ctx.step), idxs, strict=True):
            part = cols[s:s + ctx.step]
            # the kernel reads this input for its sizes and layout only: an uninitialised tensor, never read
            like = torch.empty((part.shape[0], c, h, w), dtype=grad.dtype, device=grad.device,
                               memory_format=torch.channels_last)
            gy = torch.ops.aten.max_pool2d_with_indices_backward(grad[s:s + ctx.step], like, *args, idx)
            gy = gy.permute(0, 2, 3, 1).reshape(part.shape[0], h * w, c)  # a view of the channels-last gradient
            if ctx.needs_input_grad[1]:
                gw = torch.bmm(part, gy).sum(0)  # (kh*kw, C)
                g_w = gw if g_w is None else g_w + gw
            if ctx.needs_input_grad[0]:
                g_cols.append(torch.bmm(gy, weight.expand(part.shape[0], -1, -1)).transpose(1, 2))
        g_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None  # max-pooling passes a bias through
        return (torch.cat(g_cols) if g_cols else None), (None if g_w is None else g_w.T), g_b, None, None


def _fusable_norm(m: nn.Module) -> bool:
    if isinstance(m, nn.GroupNorm):
        return m.affine
    return isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.affine and m.running_mean is None


def _is_stem(conv: nn.Module, norm: nn.Module, pool: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.groups == 1 \
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and _fusable_norm(norm) \
        and isinstance(pool, FastMaxPool) and isinstance(pool.pool, nn.MaxPool2d)


def _stem_applies(x: Tensor, norm: _Norm) -> bool:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return x.device.type == "cpu" and x.ndim == 4 and x.is_floating_point() and not wrapped(x) \
        and not wrapped(norm.weight) and bool((norm.weight > 0).all())  # else the layers one by one


class StemSequential(nn.Sequential):
    """An `nn.Sequential` that runs each (1-channel conv, norm, max-pool) run of its layers by `conv_norm_pool`.

    `plan` is the layers it runs, in order, read through nested plain `nn.Sequential`s (MONAI's `Convolution` and
    `ADN` are such), so a conv and its norm inside one block and the pool in the next still form a run; `stems`
    are the plan positions where one starts. Where the fused form does not apply to a call (a CUDA tensor, a
    `torch.func` transform, a norm weight that is not positive) the layers run one by one. Layers, names and
    parameters stay the `nn.Sequential`'s own.
    """

    plan: list[nn.Module]
    stems: frozenset[int]

    def forward(self, x: Tensor) -> Tensor:
        plan, i = self.plan, 0
        while i < len(plan):
            if i in self.stems and _stem_applies(x, plan[i + 1]):
                x, i = conv_norm_pool(x, plan[i], plan[i + 1], plan[i + 2].pool), i + 3
            else:
                x, i = plan[i](x), i + 1
        return x


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward in (nn.Sequential.forward, StemSequential.forward)


def _layers_run(seq: nn.Sequential) -> list[nn.Module]:
    plan: list[nn.Module] = []
    for m in seq:
        plan += _layers_run(m) if _plain_sequential(m) and type(m) is not StemSequential else [m]
    return plan


def fuse_stems(module: nn.Module) -> int:
    """Make each outermost plain `nn.Sequential` that runs a (1-channel conv, norm, `FastMaxPool`) sequence of
    layers a `StemSequential` (norms: see `conv_norm_pool`). Returns the number of such runs found."""
    if _plain_sequential(module):
        plan = _layers_run(module)
        stems = frozenset(i for i in range(len(plan) - 2) if _is_stem(*plan[i:i + 3]))
        if stems:
            module.__class__, module.plan, module.stems = StemSequential, plan, stems
            return len(stems)
    return sum(fuse_stems(child) for child in module.children())


_FAST_BN: dict[type, type] = {nn.BatchNorm1d: FastBatchNorm1d, nn.BatchNorm2d: FastBatchNorm2d,
                              nn.BatchNorm3d: FastBatchNorm3d}


def speed_up(module: nn.Module) -> nn.Module:
    """The rewrites of this module, in place, idempotent; returns `module`.

    `pool_before_relu`; each plain max-pool wrapped in `FastMaxPool`; each batch norm without running statistics
    given the `FastBatchNorm*` class (its subclass: same parameters, names and forward kernel, leaner double
    backward); `fuse_stems`.
    """
    pool_before_relu(module)
    for m in module.modules():
        if type(m) in _FAST_BN and m.affine and not m.track_running_stats:
            m.__class__ = _FAST_BN[type(m)]
    for parent in list(module.modules()):
        if isinstance(parent, FastMaxPool):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d | nn.MaxPool3d) and not child.return_indices:
                setattr(parent, name, FastMaxPool(child))
    fuse_stems(module)
    return module
