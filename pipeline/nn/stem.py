"""The first block of a grayscale network (1-channel conv, norm, max-pool) computed fused; `speed_up` applies it.

Used through `fuse_stems`, which `pipeline.nn.fast.speed_up` calls; see `conv_norm_pool` for why it is faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from pipeline.nn.layers import FastMaxPool, _tuple

# --- the fused block ----------------------------------------------------------------
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
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # one chunk (a support set): no copy
        return out.contiguous(memory_format=torch.channels_last)

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
