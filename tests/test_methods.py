"""Every registered method: shapes, fit/predict == forward, training gradients; hand checks; norm policy."""

import math

import pytest
import torch
from torch import nn

from pipeline.classification.methods import METHODS, build_method
from pipeline.classification.methods.maml import MAML
from pipeline.classification.methods.matching import matching_logits
from pipeline.classification.methods.siamese import contrastive_loss, nearest_support_logits
from pipeline.common.config import validate
from pipeline.nn.encoders import build_encoder, conv_encoder


def episode(n: int = 3, k: int = 2, q: int = 2, size: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n * k, 1, size, size, generator=g), torch.arange(n).repeat_interleave(k),
            torch.randn(n * q, 1, size, size, generator=g), torch.arange(n).repeat_interleave(q))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name: str) -> None:
    cfg = validate({"model": {"encoder": "conv4_2d", "filters": 4, "norm_groups": 2},
                    "method": {"name": name, "inner_steps": 1, "head_steps": 5}, "episodes": {"ways": 3}})
    torch.manual_seed(0)
    net = build_method(cfg, build_encoder(cfg.model), n_base=5)
    sx, sy, qx, qy = episode()
    out = net.task_loss(sx, sy, qx, qy, 3, classes=torch.tensor([4, 0, 2]))
    assert out.logits.shape == (6, 3) and out.loss.ndim == 0
    out.loss.backward()
    enc_grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert enc_grads and sum(g.abs().sum().item() for g in enc_grads) > 0
    with torch.no_grad():
        logits = net(sx, sy, qx, 3)
        again = net.predict(net.fit(sx, sy, 3), qx)
    assert logits.shape == (6, 3) and torch.allclose(logits, again, atol=1e-5)


def test_matching_logits_by_hand() -> None:
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])
    out = matching_logits(query, support, torch.tensor([0, 1]), 2, scale=1.0)
    # cos = (1, 0): softmax -> (e/(e+1), 1/(e+1))
    assert torch.allclose(out.exp(), torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)]]))


def test_contrastive_loss_and_nearest_support_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # pairs: (0,1) same, d=0 -> 0 ; (0,2),(1,2) different, d=sqrt2 > margin 1 -> 0
    assert contrastive_loss(z, torch.tensor([0, 0, 1]), margin=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # with margin 2: each different pair costs (2 - sqrt2)^2, averaged over 3 pairs
    want = 2 * (2 - math.sqrt(2)) ** 2 / 3
    assert contrastive_loss(z, torch.tensor([0, 0, 1]), margin=2.0).item() == pytest.approx(want, rel=1e-4)
    logits = nearest_support_logits(torch.tensor([[0.1, 1.0]]), z, torch.tensor([0, 0, 1]), 2)
    assert logits.argmax().item() == 1


def test_norm_policy_batch_statistics_everywhere_and_no_buffers() -> None:
    torch.manual_seed(0)
    enc = conv_encoder(2, 1, [4, 4], norm="batch")
    assert not list(enc.buffers())  # no running statistics to drift inside functional calls
    x = torch.randn(6, 1, 16, 16)
    train_out = enc.train()(x)
    eval_out = enc.eval()(x)
    assert torch.allclose(train_out, eval_out)  # eval uses batch statistics too
    # ... so an item's embedding depends on its batch-mates
    assert not torch.allclose(enc(x[:3])[0], enc(x)[0], atol=1e-4)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_norm_policy_group_and_instance_are_batch_independent(norm: str) -> None:
    torch.manual_seed(0)
    enc = conv_encoder(2, 1, [4, 4], norm_groups=2, norm=norm)
    x = torch.randn(6, 1, 16, 16)
    assert torch.allclose(enc(x[:3]), enc(x)[:3], atol=1e-5)


def test_maml_inner_loop_leaves_module_state_untouched() -> None:
    torch.manual_seed(0)
    net = MAML(conv_encoder(2, 1, [4, 4], norm="batch"), max_ways=3, inner_steps=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.task_loss(*episode(), n_way=3)
    net(*episode()[:3], n_way=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("encoder", ["resnet10_2d", "conv4_3d", "conv3d"])
def test_encoders_embed(encoder: str) -> None:
    cfg = validate({"model": {"encoder": encoder, "filters": 4, "channels": [4, 8], "norm_groups": 2}})
    enc = build_encoder(cfg.model)
    x = torch.randn(2, 1, *([16, 16] if encoder.endswith("2d") else [16, 16, 16]))
    assert enc(x).shape == (2, enc.out_dim)


def test_resnet_batch_policy_has_no_running_stats() -> None:
    cfg = validate({"model": {"encoder": "resnet10_2d", "norm": "batch"}})
    enc = build_encoder(cfg.model)
    assert not [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
