"""The functional inner loop: hand-computed MAML gradients, first vs second order, Meta-SGD, Reptile, vmap."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classification.methods.maml import MAML
from pipeline.classification.methods.metasgd import MetaSGD
from pipeline.classification.methods.reptile import Reptile
from pipeline.nn.encoders import conv_encoder
from pipeline.nn.inner import adapt, adapt_functional, adapt_inference, call, vmap_task_losses


def linear_case(first_order: bool) -> tuple[float, float]:
    """Two inner steps on f(x) = w x with squared loss; returns (autograd meta-gradient, hand-derived one)."""
    model = nn.Linear(1, 1, bias=False)
    w0, a, xs, ys, xq, yq = 0.5, 0.1, 2.0, 1.0, 3.0, -1.0
    with torch.no_grad():
        model.weight.fill_(w0)
    params = dict(model.named_parameters())

    def support(p: dict) -> torch.Tensor:
        return 0.5 * (call(model, p, torch.tensor([[xs]])) - ys).pow(2).sum()

    fast = adapt(params, support, steps=2, lr=a, first_order=first_order)
    (0.5 * (call(model, fast, torch.tensor([[xq]])) - yq).pow(2).sum()).backward()
    # by hand: each step w <- w (1 - a xs^2) + a xs ys, so dw2/dw0 = (1 - a xs^2)^2
    c = 1 - a * xs**2
    w1 = w0 * c + a * xs * ys
    w2 = w1 * c + a * xs * ys
    outer = (w2 * xq - yq) * xq
    return model.weight.grad.item(), outer * (1.0 if first_order else c**2)


def test_second_order_matches_hand_computed_gradient() -> None:
    got, want = linear_case(first_order=False)
    assert got == pytest.approx(want, rel=1e-6)


def test_first_order_matches_its_formula_and_differs_from_second_order() -> None:
    got_fo, want_fo = linear_case(first_order=True)
    got_so, _ = linear_case(first_order=False)
    assert got_fo == pytest.approx(want_fo, rel=1e-6)
    assert abs(got_fo - got_so) > 0.1


def tiny_encoder(norm: str = "group") -> nn.Module:
    return conv_encoder(2, 1, [4, 4], norm_groups=2, norm=norm)


def episode(n: int = 2, k: int = 2, q: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n * k, 1, size, size, generator=g), torch.arange(n).repeat_interleave(k),
            torch.randn(n * q, 1, size, size, generator=g), torch.arange(n).repeat_interleave(q))


def test_adapt_steps_only_the_parameters_the_loss_uses() -> None:
    """A parameter the loss does not reach keeps its value (no gradient); so do all of them when it reaches none,
    for the fused scalar step and for per-parameter step sizes alike."""
    a, b, outside = (torch.tensor([1.0, 2.0], requires_grad=True) for _ in range(3))
    for lr in (0.5, {"a": torch.tensor(0.5), "b": torch.tensor(0.5)}):
        fast = adapt({"a": a, "b": b}, lambda p: (p["a"] ** 2).sum(), 2, lr)
        torch.testing.assert_close(fast["a"], a * 0.0)  # a <- a - 0.5 * 2a = 0 after the first step
        assert fast["b"] is b
        fast = adapt({"a": a, "b": b}, lambda p: (outside ** 2).sum(), 2, lr)
        assert fast["a"] is a and fast["b"] is b


def test_metasgd_step_sizes_receive_gradients_in_both_orders() -> None:
    for first_order in (False, True):
        torch.manual_seed(0)
        net = MetaSGD(tiny_encoder(), max_ways=2, inner_steps=2, inner_lr=0.1, first_order=first_order)
        net.task_loss(*episode(), n_way=2).loss.backward()
        grads = [lr.grad for lr in net.lrs]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
        assert all(g.shape == p.shape for g, p in zip(grads, net.net.parameters(), strict=True))


def test_reptile_moves_weights_toward_adapted_weights() -> None:
    torch.manual_seed(0)
    net = Reptile(tiny_encoder(), max_ways=2, inner_steps=3, inner_lr=0.1)
    sx, sy, qx, qy = episode()
    before = {k: v.detach().clone() for k, v in net.net.named_parameters()}
    phi = adapt(net.params(), net.support_loss(torch.cat([sx, qx]), torch.cat([sy, qy]), 2), 3, 0.1,
                first_order=True)
    eps = 0.25
    opt = torch.optim.SGD(net.parameters(), lr=eps)
    net.task_loss(sx, sy, qx, qy, 2).loss.backward()
    opt.step()
    for k, v in net.net.named_parameters():
        # theta <- theta + eps (phi - theta)
        assert torch.allclose(v, before[k] + eps * (phi[k].detach() - before[k]), atol=1e-6)
    dist_before = sum((before[k] - phi[k]).pow(2).sum() for k in before)
    dist_after = sum((v - phi[k]).pow(2).sum() for k, v in net.net.named_parameters())
    assert dist_after < dist_before


def test_inference_adaptation_builds_no_outer_graph_and_matches_training_values() -> None:
    torch.manual_seed(0)
    net = MAML(tiny_encoder(), max_ways=2, inner_steps=3, inner_lr=0.2)
    sx, sy, qx, _ = episode()
    loss_fn = net.support_loss(sx, sy, 2)
    with torch.no_grad():
        fast = adapt_inference(net.params(), loss_fn, 3, 0.2)
    assert all(v.grad_fn is None and not v.requires_grad for v in fast.values())
    ref = adapt(net.params(), loss_fn, 3, 0.2)
    assert all(torch.allclose(fast[k], ref[k], atol=1e-6) for k in ref)
    with torch.no_grad():
        logits = net(sx, sy, qx, 2)
    assert logits.shape == (4, 2) and logits.grad_fn is None


def meta_grads(net: MAML, batch: tuple[torch.Tensor, ...], use_vmap: bool) -> list[torch.Tensor]:
    net.zero_grad()
    if use_vmap:
        net.vmap_task_losses(*batch, n_way=2)[0].sum().backward()
    else:
        sum(net.task_loss(*(b[t] for b in batch), n_way=2).loss for t in range(len(batch[0]))).backward()
    return [p.grad.clone() for p in net.net.parameters()]


@pytest.mark.parametrize(("norm", "first_order"), [("group", False), ("group", True), ("batch", True)])
def test_vmap_over_tasks_matches_per_task_loop(norm: str, first_order: bool) -> None:
    torch.manual_seed(0)
    net = MAML(tiny_encoder(norm), max_ways=2, inner_steps=2, inner_lr=0.3, first_order=first_order)
    tasks = [episode(seed=s) for s in range(3)]
    batch = tuple(torch.stack([t[i] for t in tasks]) for i in range(4))
    loop, vect = meta_grads(net, batch, False), meta_grads(net, batch, True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(loop, vect, strict=True))


def test_functional_and_autograd_inner_loops_agree() -> None:
    torch.manual_seed(0)
    net = MAML(tiny_encoder(), max_ways=2)
    sx, sy, _, _ = episode()
    a = adapt(net.params(), net.support_loss(sx, sy, 2), 2, 0.3)
    b = adapt_functional(net.params(), net.support_loss(sx, sy, 2), 2, 0.3)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert vmap_task_losses(lambda p, x: F.cross_entropy(call(net.net, p, x), sy), net.params(),
                            sx[None].repeat(2, 1, 1, 1, 1)).shape == (2,)


def test_channels_last_layout_gives_the_same_meta_gradients() -> None:
    grads = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = MAML(tiny_encoder(), max_ways=2, inner_steps=2, inner_lr=0.3, channels_last=channels_last)
        net.task_loss(*episode(), n_way=2).loss.backward()
        grads.append([p.grad for p in net.net.parameters()])
    assert net.channels_last and net.net[0][0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("method", ["maml", "metasgd"])
def test_threaded_tasks_give_the_loop_gradients(method: str) -> None:
    """Tasks in parallel threads (each on a parameter-sharing replica) sum to exactly the sequential gradients."""
    from pipeline.nn.inner import replicate, threaded_task_grads

    torch.manual_seed(0)
    cls = MAML if method == "maml" else MetaSGD
    net = cls(tiny_encoder("batch"), max_ways=2, inner_steps=2, inner_lr=0.3)
    tasks = [episode(seed=s) for s in range(4)]
    for t in tasks:
        (net.task_loss(*t, n_way=2).loss / len(tasks)).backward()
    loop = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    logits = threaded_task_grads(net, tasks, lambda m, t: ((out := m.task_loss(*t, n_way=2)).loss / len(tasks),
                                                           out.logits.detach()), threads=2)
    assert len(logits) == 4 and logits[0].shape == (len(tasks[0][3]), 2)
    threaded = [p.grad for p in net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(loop, threaded, strict=True))
    assert any(float(g.abs().sum()) > 0 for g in threaded)
    rep = replicate(net)
    assert rep is not net and all(a is b for a, b in zip(rep.parameters(), net.parameters(), strict=True))


@pytest.mark.parametrize("dims", [2, 3])
def test_speed_up_keeps_outputs_and_second_order_gradients_bitwise(dims: int) -> None:
    """MAML reorders ReLU -> max-pool into pool -> ReLU and runs pools channels-last: nothing observable changes.

    (GroupNorm here: the batch-norm rewrite changes second-order gradients by rounding, tested on its own below.)
    """
    import copy

    from pipeline.nn.fast import speed_up
    from pipeline.nn.layers import FastMaxPool, pool_before_relu

    conv, pool = (nn.Conv3d, nn.MaxPool3d) if dims == 3 else (nn.Conv2d, nn.MaxPool2d)
    torch.manual_seed(0)
    # two input channels: a 1-channel first block would be fused (equal to rounding only; tests/test_layers.py)
    net = nn.Sequential(conv(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), pool(2),
                        conv(4, 4, 3, padding=1), nn.ReLU(), pool(3, stride=2, padding=1, ceil_mode=True),
                        nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(6, 2, *[9] * dims)
    net(x)  # materialise the lazy head
    fast_net = speed_up(copy.deepcopy(net))
    assert isinstance(fast_net[2], FastMaxPool) and isinstance(fast_net[3], nn.ReLU)
    assert isinstance(speed_up(fast_net)[2].pool, nn.MaxPool2d | nn.MaxPool3d)  # idempotent: no double wrapping
    assert pool_before_relu(copy.deepcopy(net)) == 2
    assert list(fast_net.state_dict()) == list(net.state_dict())
    assert torch.equal(net(x), fast_net(x))
    grads = []
    for model in (net, fast_net):
        params = dict(model.named_parameters())
        fast = adapt(params, lambda p, m=model: F.cross_entropy(call(m, p, x), torch.arange(6) % 2), 2, 0.5)
        grads.append(torch.autograd.grad(call(model, fast, x).pow(2).sum(), list(params.values())))
    # many windows are all-negative before the ReLU (ties at 0 after it): the gradients must still be identical
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert all(float(g.abs().sum()) > 0 for g in grads[0])


def test_fast_max_pool_matches_pytorch_in_values_ties_and_higher_order_gradients() -> None:
    from pipeline.nn.layers import FastMaxPool

    torch.manual_seed(0)
    for ref in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.MaxPool3d(2)):
        d = 3 if isinstance(ref, nn.MaxPool3d) else 2
        x = torch.randn(2, 3, *[7] * d, dtype=torch.double).relu().requires_grad_()  # relu: many tied zeros
        fast = FastMaxPool(ref)
        assert torch.equal(fast(x), ref(x))
        w = torch.randn_like(ref(x))
        g_ref, = torch.autograd.grad((ref(x) * w).sum(), x, create_graph=True)
        g_fast, = torch.autograd.grad((fast(x) * w).sum(), x, create_graph=True)
        assert torch.equal(g_ref, g_fast)
        assert torch.autograd.gradgradcheck(fast, (torch.randn(1, 2, *[5] * d, dtype=torch.double,
                                                                requires_grad=True),))


@pytest.mark.parametrize("name", ["protonet", "matching", "siamese", "finetune", "maml", "metasgd", "reptile"])
def test_every_method_runs_its_encoder_through_speed_up(name: str) -> None:
    """Built by config or by hand, each method gets the exact faster pools (and pool -> ReLU order) once."""
    from pipeline.classification.methods.finetune import FineTune
    from pipeline.classification.methods.matching import MatchingNet
    from pipeline.classification.methods.protonet import ProtoNet
    from pipeline.classification.methods.siamese import Siamese
    from pipeline.nn.layers import FastMaxPool

    def encoder() -> nn.Module:
        enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        enc.out_dim = 4 * 4 * 4
        return enc

    build = {"protonet": lambda: ProtoNet(encoder()), "matching": lambda: MatchingNet(encoder()),
             "siamese": lambda: Siamese(encoder()), "finetune": lambda: FineTune(encoder(), n_base=3),
             "maml": lambda: MAML(encoder(), 2), "metasgd": lambda: MetaSGD(encoder(), 2),
             "reptile": lambda: Reptile(encoder(), 2)}
    model = build[name]()
    pools = [m for m in model.modules() if isinstance(m, FastMaxPool)]
    assert len(pools) == 1 and not isinstance(pools[0].pool, FastMaxPool)
    seq = next(m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d))
    assert isinstance(seq[1], FastMaxPool) and isinstance(seq[2], nn.ReLU)
