"""`pipeline/layers.py`: the batch-norm rewrite that `speed_up` applies (the pool rewrites: tests/test_maml.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layers import FastBatchNorm2d, _BatchNormBatchStats, speed_up
from pipeline.methods.maml import adapt, call


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)


def _ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _BatchNormBatchStats.apply(x, w, b, 1e-5)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 5, 5), (2, 3, 3, 4, 3)])
def test_batch_norm_rewrite_matches_pytorch_forward_backward_and_double_backward(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    up, probe = torch.randn(shape, dtype=torch.double), torch.randn(shape, dtype=torch.double)
    results = []
    for fn in (_reference, _ours):
        y = fn(x, w, b)
        gx, gw, gb = torch.autograd.grad((y * up).pow(2).sum(), (x, w, b), create_graph=True)
        # a second-order quantity touching every output of the backward, as MAML's outer gradient does
        second = torch.autograd.grad((gx * probe).sum() + gw.pow(2).sum() + (gb * gw).sum(), (x, w, b))
        results.append((y, (gx, gw, gb), second))
    (y0, first0, second0), (y1, first1, second1) = results
    assert torch.equal(y0, y1)  # same forward kernel
    assert all(torch.equal(a, c) for a, c in zip(first0, first1, strict=True))  # same backward kernel
    for a, c in zip(second0, second1, strict=True):
        assert float(c.abs().max()) > 1e-3
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(_ours, (x, w, b))  # the closed form against finite differences


def test_batch_norm_rewrite_when_only_the_parameter_gradients_are_used() -> None:
    """The input's gradient is computed but nothing downstream uses it: the double backward gets no gradient for
    it and takes its short branch, which must still give the right second derivative with respect to x."""
    torch.manual_seed(2)
    x = torch.randn(5, 3, 4, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    up = torch.randn(5, 3, 4, 4, dtype=torch.double)
    outs = []
    for fn in (_reference, _ours):
        _, gw, gb = torch.autograd.grad((fn(x, w, b) * up).pow(2).sum(), (x, w, b), create_graph=True)
        outs.append(torch.autograd.grad(gw.pow(2).sum() + (gb * gw).sum(), (x, w)))
    for a, c in zip(*outs, strict=True):
        assert float(a.abs().max()) > 1e-3
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def test_batch_norm_rewrite_with_an_input_that_needs_no_gradient() -> None:
    """First layer of a network: only the weight and bias need gradients, and the backward skips the input's."""
    torch.manual_seed(1)
    x = torch.randn(5, 2, 4, 4, dtype=torch.double)
    w = torch.randn(2, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, dtype=torch.double, requires_grad=True)
    outs = []
    for fn in (_reference, _ours):
        gw, gb = torch.autograd.grad(fn(x, w, b).pow(3).sum(), (w, b), create_graph=True)
        outs.append(torch.autograd.grad(gw.pow(2).sum() + gb.sum() * gw.sum(), (w, b)))
    for a, c in zip(*outs, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda w, b: _ours(x, w, b), (w, b))


def test_speed_up_gives_batch_norms_without_running_statistics_the_fast_class_only() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4),
                        nn.BatchNorm3d(4, affine=False, track_running_stats=False))
    keys = list(net.state_dict())
    speed_up(net)
    assert type(net[1]) is FastBatchNorm2d and isinstance(net[1], nn.BatchNorm2d)
    assert type(net[2]) is nn.BatchNorm2d  # running statistics: left alone (its forward mutates buffers)
    assert type(net[3]) is nn.BatchNorm3d  # no affine parameters: left alone
    assert list(speed_up(net).state_dict()) == keys and type(net[1]) is FastBatchNorm2d  # names kept; idempotent
    x = torch.randn(3, 4, 5, 5)
    assert type(net[1](x).grad_fn).__name__ == "_BatchNormBatchStatsBackward"  # training: the rewritten op
    with torch.no_grad():  # inference: nothing to differentiate, PyTorch's own layer, the same values
        assert torch.equal(net[1](x), F.batch_norm(x, None, None, net[1].weight, net[1].bias, True, 0.1, 1e-5))


def test_second_order_maml_gradients_through_the_rewritten_batch_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)).double()
    fast_net = speed_up(copy.deepcopy(net))
    assert sum(type(m) is FastBatchNorm2d for m in fast_net.modules()) == 2
    sx, qx = torch.randn(4, 1, 8, 8, dtype=torch.double), torch.randn(6, 1, 8, 8, dtype=torch.double)
    sy, qy = torch.arange(4) % 2, torch.arange(6) % 2
    grads = []
    for model in (net, fast_net):
        params = dict(model.named_parameters())
        fast = adapt(params, lambda p, m=model: F.cross_entropy(call(m, p, sx), sy), 3, 0.5)
        grads.append(torch.autograd.grad(F.cross_entropy(call(model, fast, qx), qy), list(params.values())))
    for a, c in zip(*grads, strict=True):
        assert float(a.abs().sum()) > 0
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)
