"""One Reptile outer update (`pipeline.nn.inner`) for classification's Reptile and registration's Reptile."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.nn.inner import reptile_loss, reptile_update


def test_an_sgd_step_on_reptile_loss_is_reptile_update_bitwise() -> None:
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    phi = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in theta.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.SGD(leaves.values(), lr=0.37)
    reptile_loss(leaves, phi).backward()
    assert all(torch.equal(leaves[k].grad, theta[k] - phi[k]) for k in theta)  # the gradient is theta - phi
    opt.step()
    moved = {k: v.clone() for k, v in theta.items()}
    reptile_update(moved, phi, 0.37)
    assert all(torch.equal(leaves[k].detach(), moved[k]) for k in theta)
    assert all(not torch.equal(moved[k], theta[k]) for k in theta)


def test_reptile_update_moves_weights_and_running_statistics_and_copies_counters() -> None:
    torch.manual_seed(0)
    model, adapted = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    adapted(torch.randn(8, 3) * 4 + 2)  # running statistics and num_batches_tracked move
    with torch.no_grad():
        adapted.weight.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reptile_update(model.state_dict(), adapted.state_dict(), 0.25)
    new = adapted.state_dict()
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.allclose(model.state_dict()[name], before[name] + 0.25 * (new[name] - before[name]))
    assert not torch.equal(model.running_mean, before["running_mean"])
    assert int(model.num_batches_tracked) == 1  # a counter is copied, not interpolated


def test_classification_reptile_ignores_method_vmap(tmp_path: Path) -> None:
    """MAML's vectorised path computes MAML's query loss; Reptile must train the same with `method.vmap` on."""
    from test_train import tiny_config

    from pipeline.classification.train import train

    runs = []
    for vmap in ("false", "true"):
        cfg = tiny_config(tmp_path, "method.name=reptile", "method.inner_steps=1", "method.meta_batch=2",
                          f"method.vmap={vmap}", "train.iterations=1", "train.val_every=0")
        runs.append(load_file(str(train(cfg, tmp_path / f"vmap_{vmap}") / "model.safetensors")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
