"""`pipeline/nn/layers.py` and `pipeline/nn/stem.py`: the batch-norm rewrite and the fused first block that `speed_up`
applies (the pool rewrites: tests/test_maml.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classification.methods.maml import MAML
from pipeline.nn.encoders import conv_encoder
from pipeline.nn.fast import speed_up
from pipeline.nn.inner import adapt, call
from pipeline.nn.layers import FastBatchNorm2d, _BatchNormBatchStats
from pipeline.nn.stem import StemSequential


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)


def _ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _BatchNormBatchStats.apply(x, w, b, 1e-5)


def _maml_grads(model: nn.Module, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                steps: int) -> tuple[torch.Tensor, ...]:
    """Second-order MAML meta-gradients of `model`'s parameters: `steps` inner steps at 0.5 on (sx, sy), query loss."""
    params = dict(model.named_parameters())
    fast = adapt(params, lambda p: F.cross_entropy(call(model, p, sx), sy), steps, 0.5)
    return torch.autograd.grad(F.cross_entropy(call(model, fast, qx), qy), list(params.values()))


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
    grads = [_maml_grads(model, sx, sy, qx, qy, 3) for model in (net, fast_net)]
    for a, c in zip(*grads, strict=True):
        assert float(a.abs().sum()) > 0
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)


# --- the fused first block (1-channel conv, batch norm with batch statistics, max-pool) ---------------------------
def _grayscale_net(conv: nn.Conv2d, pool: nn.MaxPool2d, features: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), pool,
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(features, 3)).double()


@pytest.mark.parametrize("block", ["conv4", "strided", "encoder", "group", "instance"])
def test_fused_first_block_matches_the_layers_at_every_order(block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`speed_up` runs a grayscale network's first block fused; outputs and second-order MAML gradients agree.

    The images have a zero background, so many pool windows hold tied maxima (the fused block pools before it
    normalises: ties must still go where PyTorch sends them). The second case covers stride, dilation, pool
    padding and ceil mode; the others are the project's own `conv4_2d` (MONAI blocks: the conv and its norm in one
    nested block, the pool in the next) with each normalisation policy.
    """
    from pipeline.nn import stem

    torch.manual_seed(0)
    if block == "conv4":
        net = _grayscale_net(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), 4 * 2 * 2)
    elif block == "strided":
        net = _grayscale_net(nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2),
                             nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), 4 * 1 * 1)
    else:
        norm = {"encoder": "batch", "group": "group", "instance": "instance"}[block]
        net = nn.Sequential(conv_encoder(2, 1, [4, 4], norm_groups=2, norm=norm), nn.Linear(4, 3)).double()
    fast_net = speed_up(copy.deepcopy(net))
    assert type(fast_net) is StemSequential and fast_net.stems == {0}
    assert list(fast_net.state_dict()) == list(net.state_dict())
    calls, real = [], stem.conv_norm_pool
    monkeypatch.setattr(stem, "conv_norm_pool", lambda *a: (calls.append(1), real(*a))[1])

    def images(n: int) -> torch.Tensor:
        x = torch.zeros(n, 1, 8, 8, dtype=torch.double)
        x[:, :, 2:6, 3:7] = torch.randn(n, 1, 4, 4, dtype=torch.double)  # a lesion on a zero background
        return x

    sx, qx = images(4), images(6)
    sy, qy = torch.arange(4) % 3, torch.arange(6) % 3
    torch.testing.assert_close(fast_net(qx), net(qx), rtol=1e-12, atol=1e-12)
    assert calls
    grads = [_maml_grads(model, sx, sy, qx, qy, 3) for model in (net, fast_net)]
    conv_biases = {f"{n}.bias" for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    for name, a, c in zip(dict(net.named_parameters()), *grads, strict=True):
        if name not in conv_biases:  # a norm removes a conv bias: zero gradient up to rounding
            assert float(a.abs().max()) > 1e-4, name
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)


def test_fused_first_block_in_chunks_keeps_no_full_resolution_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """With chunks of one image the fused block still matches the layers (values, gradients for the input too, and
    second-order MAML gradients), and what autograd keeps for the backward holds no tensor of the conv output's
    full resolution (64x the input: the memory the chunking saves)."""
    from pipeline.nn import stem

    monkeypatch.setattr(stem, "_CHUNK_BYTES", 1)  # every image its own chunk
    torch.manual_seed(3)
    net = _grayscale_net(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), 4 * 2 * 2)
    fast_net = speed_up(copy.deepcopy(net))
    x = torch.randn(5, 1, 8, 8, dtype=torch.double, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        out = fast_net(x)
    torch.testing.assert_close(out, net(x), rtol=1e-12, atol=1e-12)
    assert saved and 5 * 4 * 8 * 8 not in saved  # no tensor of the conv output's (N, C, H, W) size is kept
    up = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *fast_net.parameters()], up)
    want = torch.autograd.grad(net(x), [x, *net.parameters()], up)
    for a, c in zip(want, got, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)
    sx, qx, sy, qy = x.detach()[:3], x.detach()[3:], torch.arange(3), torch.arange(2)
    grads = [_maml_grads(model, sx, sy, qx, qy, 2) for model in (net, fast_net)]
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)


def test_fused_first_block_falls_back_to_the_layers_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch-norm weight that is not positive breaks the pool-before-normalising step: the layers run one by one,
    giving PyTorch's values exactly; inside `torch.func` transforms too. Other first blocks are not fused."""
    from pipeline.nn import stem

    torch.manual_seed(1)
    net = _grayscale_net(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), 4 * 2 * 2)
    with torch.no_grad():
        net[1].weight[2] = -0.5
    fast_net = speed_up(copy.deepcopy(net))
    monkeypatch.setattr(stem, "conv_norm_pool", lambda *a: pytest.fail("fused block used"))
    x = torch.randn(5, 1, 8, 8, dtype=torch.double)
    assert torch.equal(fast_net(x), net(x))
    with torch.no_grad():
        net[1].weight[2] = fast_net[1].weight[2] = 0.5  # now the fused form applies, but not under vmap
    tasks = torch.randn(2, 5, 1, 8, 8, dtype=torch.double)
    out = torch.func.vmap(fast_net)(tasks)  # inside a transform: the plain layers
    for task, got in zip(tasks, out, strict=True):
        torch.testing.assert_close(got, net(task), rtol=1e-12, atol=1e-12)
    for first in (nn.Conv2d(2, 4, 3), nn.Conv2d(1, 4, 3, padding_mode="reflect", padding=1)):
        other = speed_up(nn.Sequential(first, nn.BatchNorm2d(4, track_running_stats=False), nn.MaxPool2d(2)))
        assert type(other) is nn.Sequential
    running = speed_up(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)))
    assert type(running) is nn.Sequential  # running statistics: batch norm is not a function of the batch alone
    assert type(speed_up(conv_encoder(2, 3, [4, 4], norm="group"))) is nn.Sequential  # 3 input channels


def test_maml_stores_conv_weights_channels_last_after_a_fused_first_block() -> None:
    """The fused block hands channels-last activations on; MAML then keeps its conv weights channels-last too."""
    fused = MAML(conv_encoder(2, 1, [4, 4], norm="batch"), 2)
    plain = MAML(conv_encoder(2, 3, [4, 4], norm="batch"), 2)
    assert type(fused.net) is StemSequential and fused.channels_last and not plain.channels_last
    conv = fused.net[0][2].conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not MAML(conv_encoder(2, 1, [4, 4], norm="batch"), 2, channels_last=False).channels_last
