"""Reptile's meta-update and the network's starting point."""

from __future__ import annotations

import copy

import torch

from pipeline.common.config import RegistrationConfig
from pipeline.registration.network import (
    GLOBALNET_LR_SCALE,
    Losses,
    RegistrationNet,
    optimiser,
    predict,
    reptile_step,
    train_steps,
)


def setup() -> tuple[RegistrationConfig, RegistrationNet, Losses, tuple]:
    rcfg = RegistrationConfig(features=4, levels=2, half_res=False, prealign="globalnet")
    torch.manual_seed(0)
    net = RegistrationNet(rcfg, (8, 8, 8))
    moving = torch.rand(2, 1, 8, 8, 8)
    batch = (moving, moving.roll(1, dims=2), None, None)
    return rcfg, net, Losses(rcfg, 1), batch


def test_network_starts_at_the_identity() -> None:
    _, net, _, (moving, fixed, _, _) = setup()
    net.eval()
    with torch.no_grad():
        assert net(moving, fixed).abs().max() < 1e-5


def test_reptile_moves_the_weights_part_way_toward_the_adapted_ones() -> None:
    _, net, losses, batch = setup()
    theta = copy.deepcopy(net.state_dict())
    # phi: the same inner loop run by hand on a copy
    fast = copy.deepcopy(net)
    train_steps(fast, losses, lambda: batch, 2, optimiser(fast, 1e-2))
    phi = fast.state_dict()
    _, state = reptile_step(net, losses, lambda: batch, 2, 1e-2, meta_lr=0.5)
    moved = 0
    for name, value in net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, theta[name] + 0.5 * (phi[name] - theta[name]), atol=1e-6, rtol=1e-5)
            moved += int(not torch.equal(phi[name], theta[name]))
    assert moved > 0
    assert state["state"]  # the inner Adam state is handed back for the next task


def test_globalnet_gets_a_smaller_learning_rate() -> None:
    _, net, _, _ = setup()
    groups = optimiser(net, 1e-3).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * GLOBALNET_LR_SCALE]
    n_global = sum(1 for n, _ in net.named_parameters() if n.startswith("globalnet."))
    assert len(groups[1]["params"]) == n_global > 0


def test_diffeomorphic_network_does_not_fold_a_field_its_plain_output_folds() -> None:
    """The same weights, with an output layer scaled up to a ~4-voxel field: the plain network's field folds, the
    diffeomorphic one (its output integrated as a velocity field) has det J > 0 at every interior voxel."""
    import numpy as np
    from scipy import ndimage

    from pipeline.registration.deformation import folding_ratio, jacobian_determinant

    rng = np.random.default_rng(0)
    moving, fixed = (torch.from_numpy(ndimage.gaussian_filter(rng.normal(size=(16, 16, 16)), 2.0)
                                      .astype(np.float32))[None, None] for _ in range(2))
    dets = {}
    for diffeomorphic in (False, True):
        rcfg = RegistrationConfig(features=4, levels=2, prealign="none", diffeomorphic=diffeomorphic)
        torch.manual_seed(0)
        net = RegistrationNet(rcfg, (16, 16, 16))
        head = [m for m in net.local.modules() if isinstance(m, torch.nn.Conv3d)][-1]  # zero-initialised
        with torch.no_grad():
            head.weight.copy_(3.0 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
        ddf = predict(net, moving, fixed)[0].numpy()
        assert np.abs(ddf).max() > 3.0
        dets[diffeomorphic] = jacobian_determinant(ddf)[1:-1, 1:-1, 1:-1]
    assert folding_ratio(dets[False]) > 0.01
    assert dets[True].min() > 0, dets[True].min()
