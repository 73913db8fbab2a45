"""Test-time instance optimisation of one pair's field (`network.refine`)."""

from __future__ import annotations

import torch

from pipeline.common.config import RegistrationConfig
from pipeline.registration.deformation import folding_ratio, jacobian_determinant, warp
from pipeline.registration.network import Losses, refine

FOLDING_BOUND = 0.005  # the bound: < 0.5% of voxels with det J <= 0


def blob_pair(shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A smooth image (a Gaussian blob on a gradient), the same image under a known smooth deformation (a
    sinusoidal bump of up to `shift` voxels), and that deformation `(1, 3, *S)`, which registers the pair."""
    size = (32, 32, 32)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"))
    centre = torch.tensor([15.0, 17.0, 16.0]).view(3, 1, 1, 1)
    image = torch.exp(-((grid - centre) ** 2).sum(0) / (2 * 6.0**2)) + 0.2 * grid[0] / 32
    ddf = torch.zeros(1, 3, *size)
    ddf[0, 0] = shift * torch.sin(torch.pi * grid[1] / 31) * torch.sin(torch.pi * grid[2] / 31)
    moving = image[None, None]
    fixed = warp(moving, ddf)  # fixed(x) = moving(x + ddf(x)): `ddf` is the exact answer
    return moving, fixed, ddf


def test_refine_lowers_the_pair_loss_and_keeps_the_field_unfolded() -> None:
    torch.manual_seed(0)
    rcfg = RegistrationConfig(similarity="lncc", lncc_kernel=5, regulariser="bending", reg_weight=1.0)
    losses = Losses(rcfg, 1)
    moving, fixed, _ = blob_pair()
    start = torch.zeros(1, 3, *moving.shape[2:])
    before = float(losses(start, (moving, fixed, None, None), labels=False)["total"])
    refined = refine(start, moving, fixed, losses, steps=60, lr=0.2)
    after = float(losses(refined, (moving, fixed, None, None), labels=False)["total"])
    assert after < before - 0.01, (before, after)
    assert folding_ratio(jacobian_determinant(refined[0].numpy())) < FOLDING_BOUND
    # the image similarity itself improved, not only the regulariser
    sim = [float(losses.similarity(warp(moving, d), fixed)) for d in (start, refined)]
    assert sim[1] < sim[0]


def test_refine_moves_toward_the_known_deformation_and_zero_steps_is_the_identity() -> None:
    torch.manual_seed(0)
    losses = Losses(RegistrationConfig(lncc_kernel=5), 1)
    moving, fixed, truth = blob_pair()
    start = torch.zeros_like(truth)
    assert refine(start, moving, fixed, losses, steps=0, lr=0.2) is start
    refined = refine(start, moving, fixed, losses, steps=60, lr=0.2)
    assert (refined - truth).abs().mean() < 0.9 * truth.abs().mean()  # closer to the truth than no registration
    along = torch.corrcoef(torch.stack([refined[0, 0].flatten(), truth[0, 0].flatten()]))[0, 1]
    assert along > 0.9  # the recovered displacement has the known shape and sign


def test_refine_keeps_the_starting_field_and_does_not_touch_it() -> None:
    losses = Losses(RegistrationConfig(lncc_kernel=5), 1)
    moving, fixed, truth = blob_pair()
    start = truth.clone()
    refined = refine(start, moving, fixed, losses, steps=5, lr=0.05)
    assert torch.equal(start, truth)  # the input field is not modified in place
    assert (refined - truth).abs().max() < 5 * 0.05 * 2 * 1.1  # five Adam steps of ~0.05 (half grid, x2 voxels)


def test_coarse_to_fine_scales_recover_a_large_deformation_better_and_the_weight_smooths() -> None:
    """A coarse 1/4 scale before the 1/2 one reaches a 6-voxel deformation that the half-resolution residual
    alone, given the same steps per scale, approaches only part way; a heavier `instance_reg_weight` gives a
    smoother field (lower bending energy)."""
    torch.manual_seed(0)
    moving, fixed, truth = blob_pair(shift=6.0)
    start = torch.zeros_like(truth)

    def run(**kw: object) -> torch.Tensor:
        losses = Losses(RegistrationConfig(lncc_kernel=5, **kw), 1)
        return refine(start, moving, fixed, losses, steps=30, lr=0.2)

    half, coarse = run(instance_scales=[2]), run(instance_scales=[4, 2])
    assert torch.equal(run(instance_scales=[4, 2], instance_coarse_steps=0), half)  # no coarse steps: as [2]
    assert not torch.equal(run(instance_scales=[4, 2], instance_coarse_steps=10), coarse)
    error = [float((d - truth).abs().mean()) for d in (half, coarse)]
    assert error[1] < error[0], error
    assert folding_ratio(jacobian_determinant(coarse[0].numpy())) < FOLDING_BOUND
    bending = Losses(RegistrationConfig(lncc_kernel=5), 1).regulariser
    stiff = run(instance_scales=[4, 2], instance_reg_weight=20.0)
    assert float(bending(stiff)) < float(bending(coarse))
