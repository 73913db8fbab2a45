"""Learned deformable registration: MONAI networks and losses, Reptile meta-learning, test-time adaptation.

The network maps a (moving, fixed) pair to a DDF in voxel units of the fixed grid (see `pipeline.deformation`).
Normalisation policy: MONAI's registration networks use BatchNorm; training and adaptation steps run in train mode
(batch statistics), prediction in eval mode (running statistics). Reptile interpolates the running statistics
like the weights, so the meta-initialisation carries statistics that match it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import (
    BendingEnergyLoss,
    DiceLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    LocalNormalizedCrossCorrelationLoss,
)
from monai.networks.blocks import DVF2DDF
from monai.networks.nets import GlobalNet, LocalNet, RegUNet, VoxelMorphUNet
from torch import Tensor, nn

from datasets.volume import FewscanError
from pipeline.common.config import RegistrationConfig
from pipeline.nn.inner import reptile_update
from pipeline.registration.deformation import warp
from pipeline.registration.episodes import Batch

GLOBALNET_LR_SCALE = 0.01
# MONAI's BendingEnergyLoss indexes with lists (monai/losses/deform.py); torch warns on every call
warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")


def _deformable(rcfg: RegistrationConfig) -> nn.Module:
    """The MONAI network predicting a 3-channel field from the 2-channel (moving, fixed) input."""
    levels = tuple(range(rcfg.levels))
    if rcfg.network == "localnet":
        # zero-initialised output: training starts from the identity transform
        return LocalNet(spatial_dims=3, in_channels=2, num_channel_initial=rcfg.features, extract_levels=levels,
                        out_activation=None, out_kernel_initializer="zeros")
    if rcfg.network == "regunet":
        return RegUNet(spatial_dims=3, in_channels=2, num_channel_initial=rcfg.features, depth=rcfg.levels - 1,
                       out_activation=None, out_kernel_initializer="zeros", extract_levels=levels)
    chans = [rcfg.features * 2**i for i in range(rcfg.levels)]
    net = VoxelMorphUNet(spatial_dims=3, in_channels=2, unet_out_channels=rcfg.features,
                         channels=[c for c in chans for _ in range(2)][: 2 * rcfg.levels],
                         final_conv_channels=[rcfg.features, rcfg.features])
    last = [m for m in net.modules() if isinstance(m, nn.Conv3d)][-1]
    nn.init.zeros_(last.weight)  # start from the identity, like the zero-initialised MONAI heads
    nn.init.zeros_(last.bias)
    return nn.Sequential(net, nn.Conv3d(rcfg.features, 3, 1)) if last.out_channels != 3 else net


class RegistrationNet(nn.Module):
    """(moving, fixed) -> DDF `(B, 3, *S)`: optional GlobalNet affine stage, then the deformable network.

    With `half_res` both networks see 2x average-pooled images and the field is upsampled (and its vectors
    doubled); losses are always computed at full resolution.
    """

    def __init__(self, rcfg: RegistrationConfig, image_size: Sequence[int]) -> None:
        super().__init__()
        self.half = rcfg.half_res
        self.image_size = tuple(int(v) for v in image_size)
        problem = rcfg.grid_problem(self.image_size)
        if problem is not None:  # configs and training data are checked before this; a last guard
            raise FewscanError(f"volume size {problem}")
        size = [s // 2 for s in image_size] if self.half else list(image_size)
        self.globalnet = (GlobalNet(image_size=size, spatial_dims=3, in_channels=2, num_channel_initial=rcfg.features,
                                    depth=rcfg.levels - 1) if rcfg.prealign == "globalnet" else None)
        self.local = _deformable(rcfg)
        self.integrate = DVF2DDF(num_steps=rcfg.integration_steps) if rcfg.diffeomorphic else None

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Moving and fixed `(B, 1, *S)` -> DDF `(B, 3, *S)` in voxel units (`warped(x) = moving(x + ddf(x))`)."""
        full = moving.shape[2:]
        m, f = (F.avg_pool3d(moving, 2), F.avg_pool3d(fixed, 2)) if self.half else (moving, fixed)
        affine = None
        if self.globalnet is not None:
            affine = self.globalnet(torch.cat([m, f], 1))
            m = warp(m, affine)
        ddf = self.local(torch.cat([m, f], 1))
        if self.integrate is not None:
            ddf = self.integrate(ddf)  # stationary velocity field -> diffeomorphic DDF (scaling and squaring)
        if affine is not None:
            ddf = ddf + warp(affine, ddf)  # composition: x -> x + d(x) + a(x + d(x))
        if self.half:
            ddf = F.interpolate(ddf, size=full, mode="trilinear", align_corners=True) * 2.0
        return ddf


class Losses:
    """Image similarity + field regularisation + optional Dice of warped labels (weak supervision)."""

    def __init__(self, rcfg: RegistrationConfig, n_labels: int) -> None:
        self.rcfg = rcfg
        self.n_labels = n_labels
        lncc = rcfg.similarity == "lncc"
        self.similarity = LocalNormalizedCrossCorrelationLoss(kernel_size=rcfg.lncc_kernel) if lncc else (
            GlobalMutualInformationLoss())
        self.regulariser = BendingEnergyLoss() if rcfg.regulariser == "bending" else DiffusionLoss()
        self.dice = DiceLoss(include_background=False, softmax=False)

    def __call__(self, ddf: Tensor, batch: Batch, labels: bool = True) -> dict[str, Tensor]:
        """Loss terms and their weighted `total`; labels are used only when both sides have them and `labels`."""
        moving, fixed, ml, fl = batch
        out = {"similarity": self.similarity(warp(moving, ddf), fixed), "regulariser": self.regulariser(ddf)}
        total = out["similarity"] + self.rcfg.reg_weight * out["regulariser"]
        if labels and ml is not None and fl is not None and self.rcfg.dice_weight > 0 and self.n_labels > 1:
            onehot = F.one_hot(ml[:, 0].long(), self.n_labels).permute(0, 4, 1, 2, 3).float()
            target = F.one_hot(fl[:, 0].long(), self.n_labels).permute(0, 4, 1, 2, 3).float()
            out["dice"] = self.dice(warp(onehot, ddf), target)  # soft warp of one-hot labels: differentiable
            total = total + self.rcfg.dice_weight * out["dice"]
        out["total"] = total
        return out


def optimiser(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; GlobalNet's affine head (a linear layer with a very large fan-in) gets `lr * GLOBALNET_LR_SCALE`, or
    its affine explodes within a few steps (MONAI's registration tutorials train it at ~1e-5)."""
    affine = [p for n, p in model.named_parameters() if n.startswith("globalnet.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("globalnet.")]
    groups = [{"params": rest, "lr": lr}] + ([{"params": affine, "lr": lr * GLOBALNET_LR_SCALE}] if affine else [])
    return torch.optim.Adam(groups, lr=lr)


def train_steps(model: nn.Module, losses: Losses, batches: Callable[[], Batch], steps: int,
                opt: torch.optim.Optimizer, labels: bool = True) -> list[float]:
    """`steps` optimiser steps on batches drawn from `batches()`; returns the total loss of each step."""
    model.train()
    history = []
    device = model_device(model)
    for _ in range(steps):
        batch = tuple(t if t is None else t.to(device) for t in batches())  # pairs are prepared on the CPU
        terms = losses(model(batch[0], batch[1]), batch, labels=labels)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        history.append(float(terms["total"].detach()))
    return history


def reptile_step(model: nn.Module, losses: Losses, batches: Callable[[], Batch], inner_steps: int, lr: float,
                 meta_lr: float, inner_state: dict | None = None) -> tuple[float, dict]:
    """One Reptile meta-iteration on one task: adapt a copy with Adam, move `model` toward it.

    `theta <- theta + meta_lr * (phi - theta)` (`reptile_update`) for every float tensor of the state (weights and
    BatchNorm running statistics); memory stays that of one model copy, whatever `inner_steps`.
    The inner Adam's moment estimates are carried from task to task (`inner_state`): a fresh Adam takes
    near-constant-size first steps whatever the gradient, which made meta-training on registration losses noisy
    and slow to converge in our measurements (benchmarks/README.md); with `meta_lr=1` this is plain training.

    Returns:
        The mean inner-loop loss and the inner optimiser state to pass to the next call.
    """
    fast = copy.deepcopy(model)
    opt = optimiser(fast, lr)
    if inner_state is not None:
        opt.load_state_dict(inner_state)
    history = train_steps(fast, losses, batches, inner_steps, opt)
    reptile_update(model.state_dict(), fast.state_dict(), meta_lr)
    return sum(history) / len(history), opt.state_dict()


def adapted(model: nn.Module, losses: Losses, batches: Callable[[], Batch], steps: int, lr: float,
            labels: bool = True) -> nn.Module:
    """A copy of `model` fine-tuned for `steps` Adam steps (test-time adaptation, instance optimisation)."""
    fast = copy.deepcopy(model)
    if steps:
        train_steps(fast, losses, batches, steps, optimiser(fast, lr), labels=labels)
    fast.eval()
    return fast


def model_device(model: nn.Module) -> torch.device:
    """The device of a network's weights (where its inputs must go)."""
    return next(model.parameters()).device


def refine(ddf: Tensor, moving: Tensor, fixed: Tensor, losses: Losses, steps: int, lr: float,
           device: torch.device | None = None) -> Tensor:
    """Test-time instance optimisation of one pair's field: `steps` Adam steps on similarity + regulariser per
    scale of `registration.instance_scales`, coarse to fine (`instance_coarse_steps` at the coarser ones).

    At scale s only a residual at 1/s resolution is optimised (s^3 times cheaper per step than the full grid, and
    smooth by construction): the loss is taken on s-times average-pooled images with the pooled current field
    plus the residual, and the upsampled residual is added to the full-resolution field, so the network's fine
    detail is kept. A coarse scale first ([4, 2]) captures the large inter-subject displacements that a half-
    resolution residual alone reaches only slowly (chaos_t2_mr: benchmarks/README.md). The regulariser weighs
    `instance_reg_weight` (default `reg_weight`). No labels are used (the evaluated pair's labels are the answer).

    Args:
        ddf: the network's field `(1, 3, *S)`, voxel units of the fixed grid.
        moving: moving image `(1, 1, *S)`, already on the fixed grid.
        fixed: fixed image `(1, 1, *S)`.

        device: where to optimise (e.g. the network's `model_device`); default: where `ddf` is.

    Returns:
        The refined field `(1, 3, *S)` on `ddf`'s device; `ddf` itself when `steps` is 0.
    """
    if not steps:
        return ddf
    home = ddf.device
    ddf, moving, fixed = (t.to(device or home) for t in (ddf, moving, fixed))
    rcfg = losses.rcfg
    weight = rcfg.reg_weight if rcfg.instance_reg_weight is None else rcfg.instance_reg_weight
    field = ddf.detach()
    coarse = steps if rcfg.instance_coarse_steps is None else rcfg.instance_coarse_steps
    for n, s in enumerate(rcfg.instance_scales):
        n_steps = steps if n == len(rcfg.instance_scales) - 1 else coarse
        m, f = F.avg_pool3d(moving, s), F.avg_pool3d(fixed, s)  # s = 1: the images themselves
        base = F.avg_pool3d(field, s) / s  # voxel units of the 1/s grid
        residual = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([residual], lr=lr)
        with torch.enable_grad():
            for _ in range(n_steps):
                out = losses(base + residual, (m, f, None, None), labels=False)
                loss = out["similarity"] + weight * out["regulariser"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        up = residual.detach() if s == 1 else F.interpolate(residual.detach(), size=field.shape[2:],
                                                             mode="trilinear", align_corners=False)
        field = field + up * s
    return field.to(home)


@torch.no_grad()
def predict(model: nn.Module, moving: Tensor, fixed: Tensor) -> Tensor:
    """DDF `(B, 3, *S)` of pairs `(B, 1, *S)` in eval mode, no graph; computed on the network's device and
    returned on the inputs' device."""
    model.eval()
    device = model_device(model)
    return model(moving.to(device), fixed.to(device)).to(moving.device)
