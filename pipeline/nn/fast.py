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
  activation than its input through memory, several times over. `pipeline.nn.stem.conv_norm_pool` computes the
  block without ever holding that activation whole (PyTorch's layers make five such tensors; see its docstring).

Nothing here changes a parameter's name or value (checkpoints load either way). The pool and batch-norm rewrites
leave outputs and first-order gradients bitwise unchanged and second-order gradients through batch norm equal to
rounding; the fused first block is equal to rounding at every order (tested in float64).
"""

from __future__ import annotations

from torch import nn

from pipeline.nn.layers import _FAST_BN, FastMaxPool, pool_before_relu
from pipeline.nn.stem import fuse_stems


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


