"""Methods that can learn: MAML++ options (per-step step sizes, multi-step loss), ANIL, ProtoNet's learned
temperature and normalisation, and the no-better-than-untrained checks of train and evaluate."""

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_adapt import tiny_npz

from pipeline.classification.evaluate import episode_predictions, evaluate, no_better_than_untrained
from pipeline.classification.methods.maml import MAML, msl_weights
from pipeline.classification.methods.metasgd import MetaSGD
from pipeline.classification.methods.protonet import ProtoNet
from pipeline.classification.train import build_model, no_gain_warning, train
from pipeline.common.config import ConfigError, load_config, validate
from pipeline.common.run import load_weights, save_weights
from pipeline.nn.encoders import conv_encoder
from pipeline.nn.inner import adapt, adapt_inference, adapt_steps, replicate, step_size_at, threaded_task_grads

REPO = Path(__file__).resolve().parents[1]


def tiny_encoder() -> torch.nn.Module:
    return conv_encoder(2, 1, [4, 4], norm_groups=2)


def episode(seed: int = 0, size: int = 8) -> tuple[torch.Tensor, ...]:
    """A 2-way 2-shot 2-query episode of `size`-square images (16 for the Conv4 of the shipped configs)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 1, size, size, generator=g), torch.tensor([0, 0, 1, 1]),
            torch.randn(4, 1, size, size, generator=g), torch.tensor([0, 0, 1, 1]))


def maml(**options: object) -> MAML:
    torch.manual_seed(0)
    return MAML(tiny_encoder(), max_ways=2, inner_steps=2, inner_lr=0.3, **options)


# --- MAML++: per-step step sizes -------------------------------------------------------------------------------
def test_per_step_step_sizes_get_gradients_and_change_after_a_step() -> None:
    cfg = load_config(REPO / "configs" / "classify_maml.yaml",
                      ["method.per_step_lr=true", "method.inner_steps=2", "model.filters=4", "model.norm_groups=2"])
    net = build_model(cfg)
    assert net.lrs is not None and len(net.lrs) == len(list(net.net.parameters()))
    assert all(lr.shape == (2,) and torch.all(lr == cfg.method.inner_lr) for lr in net.lrs)
    before = [lr.detach().clone() for lr in net.lrs]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.task_loss(*episode(size=16), n_way=2).loss.backward()
    for lr in net.lrs:  # every parameter tensor's size at every step takes part in the query loss
        assert lr.grad is not None and torch.all(lr.grad != 0)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.lrs, strict=True))
    # evaluation past the trained steps keeps the last step's sizes
    schedule = net.step_sizes()
    assert step_size_at(schedule, 5) is schedule[-1] and step_size_at(0.1, 3) == 0.1


def test_per_step_step_sizes_are_the_ones_the_inner_loop_uses() -> None:
    """The learned schedule gives the adapted weights of a hand-written loop with those sizes, step by step."""
    net = maml(per_step_lr=True)
    with torch.no_grad():
        net.lrs[0].copy_(torch.tensor([0.05, 0.0]))  # first conv weight: moves at step 1 only
    sx, sy, _, _ = episode()
    fast = adapt(net.params(), net.support_loss(sx, sy, 2), 2, net.step_sizes())
    name = net.inner_names[0]
    p0 = net.params()[name]
    g0 = torch.autograd.grad(net.support_loss(sx, sy, 2)(net.params()), p0)[0]
    torch.testing.assert_close(fast[name], p0 - 0.05 * g0)
    torch.testing.assert_close(net.fit(sx, sy, 2)[name], (p0 - 0.05 * g0).detach())  # evaluation/adapt too
    assert not torch.allclose(fast[net.inner_names[-1]], net.params()[net.inner_names[-1]])


# --- MAML++: multi-step loss --------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_multi_step_loss_weights_sum_to_one_and_move_to_the_last_step(steps: int) -> None:
    anneal = 40
    previous_last = 0.0
    for it in (0, 10, 20, 39, 40, 80):
        w = msl_weights(steps, it, anneal)
        assert len(w) == steps and math.isclose(sum(w), 1.0) and min(w) >= 0
        assert w[-1] >= previous_last  # the last step only gains weight
        previous_last = w[-1]
    assert msl_weights(steps, 0, anneal) == pytest.approx([1 / steps] * steps)
    assert msl_weights(steps, anneal, anneal) == [0.0] * (steps - 1) + [1.0]
    assert msl_weights(steps, 2 * anneal, anneal) == [0.0] * (steps - 1) + [1.0]


def test_multi_step_loss_is_the_weighted_query_loss_of_every_step() -> None:
    net = maml(multi_step_loss=True, msl_iterations=10)
    sx, sy, qx, qy = episode()
    steps = list(adapt_steps(net.params(), net.support_loss(sx, sy, 2), 2, 0.3))
    query = [F.cross_entropy(net.logits(p, qx, 2), qy) for p in steps]
    net.meta_iteration = 0  # uniform: the mean of both steps' query losses
    torch.testing.assert_close(net.task_loss(sx, sy, qx, qy, 2).loss, (query[0] + query[1]) / 2)
    net.meta_iteration = 5  # halfway: weights 1/4 and 3/4
    torch.testing.assert_close(net.task_loss(sx, sy, qx, qy, 2).loss, query[0] / 4 + 3 * query[1] / 4)
    net.meta_iteration = 10  # annealed: plain MAML
    plain = maml().task_loss(sx, sy, qx, qy, 2).loss
    torch.testing.assert_close(net.task_loss(sx, sy, qx, qy, 2).loss, plain)


# --- ANIL ---------------------------------------------------------------------------------------------------------
def test_anil_keeps_the_encoder_out_of_the_inner_loop_and_matches_maml_with_a_frozen_encoder() -> None:
    anil, full = maml(adapt_head=True), maml()
    sx, sy, qx, qy = episode()
    meta = anil.params()
    assert anil.inner_names == ["1.weight", "1.bias"]
    state = anil.fit(sx, sy, 2)
    for name in meta:  # the adapted state's encoder is the meta-parameters; the head moved
        assert torch.equal(state[name], meta[name]) == (not name.startswith("1."))
    frozen = {n: 0.0 if n.startswith("0.") else 0.3 for n in full.params()}  # full MAML, encoder step size 0
    ref = adapt_inference(full.params(), full.support_loss(sx, sy, 2), 2, frozen)
    with torch.no_grad():
        torch.testing.assert_close(anil.predict(state, qx), full.logits(ref, qx, 2))
    # meta-training: the same logits and the same meta-gradients (an encoder step of 0 has Jacobian I)
    out = anil.task_loss(sx, sy, qx, qy, 2)
    fast = adapt(full.params(), full.support_loss(sx, sy, 2), 2, frozen)
    ref_logits = full.logits(fast, qx, 2)
    torch.testing.assert_close(out.logits, ref_logits)
    out.loss.backward()
    F.cross_entropy(ref_logits, qy).backward()
    for a, b in zip(anil.net.parameters(), full.net.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert float(next(anil.net[0].parameters()).grad.abs().sum()) > 0


# --- every option on the per-task loop, the threaded and the vmap paths -----------------------------------------
@pytest.mark.parametrize(("cls", "options"), [
    (MAML, {"per_step_lr": True, "multi_step_loss": True, "msl_iterations": 4}),
    (MAML, {"adapt_head": True, "per_step_lr": True}),
    (MetaSGD, {"adapt_head": True, "multi_step_loss": True, "msl_iterations": 4}),
])
def test_options_give_the_same_gradients_in_the_loop_in_threads_and_under_vmap(cls: type, options: dict) -> None:
    torch.manual_seed(0)
    net = cls(tiny_encoder(), 2, 2, 0.3, **options)
    net.meta_iteration = 1  # MSL weights away from both ends
    tasks = [episode(seed=s) for s in range(3)]
    for t in tasks:
        net.task_loss(*t, n_way=2).loss.backward()
    loop = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    threaded_task_grads(net, tasks, lambda m, t: (m.task_loss(*t, n_way=2).loss, None), threads=2)
    threaded = [p.grad for p in net.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(loop, threaded, strict=True))
    net.zero_grad(set_to_none=True)
    batch = tuple(torch.stack([t[i] for t in tasks]) for i in range(4))
    net.vmap_task_losses(*batch, n_way=2)[0].sum().backward()
    for a, p in zip(loop, net.parameters(), strict=True):
        assert (a is None and p.grad is None) or torch.allclose(a, p.grad, atol=1e-5)
    assert sum(float(lr.grad.abs().sum()) for lr in net.lrs if lr.grad is not None) > 0
    assert replicate(net).lrs[0] is net.lrs[0]


def test_options_for_another_method_are_config_errors() -> None:
    for method in [{"name": "metasgd", "per_step_lr": True}, {"name": "reptile", "adapt": "head"},
                   {"name": "reptile", "multi_step_loss": True}, {"name": "maml", "temperature": "learn"},
                   {"name": "matching", "normalize": True}]:
        with pytest.raises(ConfigError, match=f"method.{next(k for k in method if k != 'name')} applies"):
            validate({"method": method})
    for bad in ({"temperature": 0}, {"temperature": "hot"}, {"adapt": "encoder"}, {"msl_iterations": 0}):
        with pytest.raises(ConfigError, match="bad value"):
            validate({"method": {"name": "protonet", **bad}})
    assert validate({"method": {"name": "protonet", "temperature": 2}}).method.temperature == 2.0
    with pytest.raises(ValueError, match="per_step_lr"):
        MetaSGD(tiny_encoder(), 2, per_step_lr=True)


# --- ProtoNet: temperature and normalisation -------------------------------------------------------------------
def protonet_cfg(*sets: str):  # noqa: ANN201 - a Config
    return load_config(REPO / "configs" / "classify_protonet.yaml",
                       ["model.filters=4", "model.norm_groups=2", *sets])


def test_learned_temperature_gets_a_gradient_and_round_trips_through_the_weights(tmp_path: Path) -> None:
    from pipeline.classification.episodes import Episode

    torch.manual_seed(0)
    net = build_model(protonet_cfg("method.temperature=learn"))
    assert float(net.scale().detach()) == pytest.approx(1.0)  # Euclidean starts as the original ProtoNet
    sx, sy, qx, qy = episode(size=16)
    net.task_loss(sx, sy, qx, qy, 2).loss.backward()
    assert net.log_scale.grad is not None and float(net.log_scale.grad) != 0
    with torch.no_grad():
        net.log_scale.fill_(math.log(3.0))  # as if trained
        # adapt + predict (`fit`, `predict`) use the learned scale as evaluation (`forward`) does
        torch.testing.assert_close(net.predict(net.fit(sx, sy, 2), qx), net(sx, sy, qx, 2))
    save_weights(net, tmp_path / "model.safetensors")

    items = SimpleNamespace(x=torch.cat([sx, qx]))  # what `episode_predictions` reads of `Items`
    ep = Episode(classes=("a", "b"), support=(0, 1, 2, 3), query=(4, 5, 6, 7))
    before = episode_predictions(net, items, [ep], 2, 2, torch.device("cpu"), "before")[0][0]
    fresh = build_model(protonet_cfg("method.temperature=learn"))
    untrained = episode_predictions(fresh, items, [ep], 2, 2, torch.device("cpu"), "fresh")[0][0]
    after = episode_predictions(load_weights(fresh, tmp_path / "model.safetensors"), items, [ep], 2, 2,
                                torch.device("cpu"), "after")[0][0]
    assert float(fresh.scale().detach()) == pytest.approx(3.0)
    assert (before == after).all() and not (before == untrained).all()  # the temperature shapes the probabilities


def test_normalize_makes_logits_independent_of_the_embedding_length() -> None:
    sx, sy, qx = torch.tensor([[1.0, 0.0], [2.0, 0.2], [0.0, 3.0], [0.1, 1.0]]), torch.tensor([0, 0, 1, 1]), \
        torch.tensor([[3.0, 1.0]])
    plain, unit = ProtoNet(torch.nn.Identity()), ProtoNet(torch.nn.Identity(), normalize=True)
    assert unit.scale() == 5.0 and ProtoNet(torch.nn.Identity(), "cosine", normalize=True).scale() == 10.0
    torch.testing.assert_close(unit(sx, sy, qx, 2), unit(7 * sx, sy, 7 * qx, 2))
    assert not torch.allclose(plain(sx, sy, qx, 2), plain(7 * sx, sy, 7 * qx, 2))
    z = F.normalize(torch.cat([sx, qx]), dim=-1)
    protos = torch.stack([z[:2].mean(0), z[2:4].mean(0)])
    torch.testing.assert_close(unit(sx, sy, qx, 2), -5.0 * torch.cdist(z[4:], protos).pow(2))


# --- no better than untrained ---------------------------------------------------------------------------------
def test_no_better_flag_follows_the_paired_interval() -> None:
    untrained = [0.5, 0.4, 0.6, 0.5, 0.55, 0.45]
    helped = [u + d for u, d in zip(untrained, [0.3, 0.35, 0.25, 0.3, 0.4, 0.3], strict=True)]
    assert not no_better_than_untrained(helped, untrained)
    assert no_better_than_untrained(untrained, untrained)  # identical: interval [0, 0]
    assert no_better_than_untrained([u + d for u, d in zip(untrained, [0.2, -0.2, 0.1, -0.1, 0.0, 0.05],
                                                           strict=True)], untrained)  # straddles 0
    assert no_better_than_untrained([u - 0.2 for u in untrained], untrained)  # worse
    assert no_gain_warning({"best": 0.8, "untrained_validation": 0.5}) is None
    assert no_gain_warning({"best": None}) is None  # no validation classes: evaluate decides
    assert "train.iterations" in no_gain_warning({"best": 0.5, "untrained_validation": 0.5})


def test_a_run_trained_with_lr_zero_is_flagged_by_train_and_evaluate(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    tiny_npz(tmp_path / "tiny.npz", n_classes=6)
    cfg = protonet_cfg(f"data.root={tmp_path / 'tiny.npz'}", "split.novel=[c4, c5]", "split.validation=[c2, c3]",
                       "ways=2", "shots=1", "queries=2", "episodes.eval_episodes=4", "train.iterations=2",
                       "train.lr=0", "train.val_every=1", "train.val_episodes=2", "train.device=cpu",
                       "train.tensorboard=false", "method.meta_batch=1", "method.temperature=learn")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train(cfg, run)
    assert "validation accuracy never beat the untrained encoder's" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = evaluate(run)
    assert report["no_better_than_untrained"] is True
    assert report["paired"]["untrained"]["accuracy"]["ci95"] == [0.0, 0.0]
    assert "no better than untrained" in caplog.text and "classify_finetune.yaml" in caplog.text
