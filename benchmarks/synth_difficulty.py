"""How hard are the rare lesion types of the synthetic demo cohort? Linear probes against a tiny 3D CNN.

Usage (from the repository root)::

    .venv/bin/python benchmarks/synth_difficulty.py [--patients 600] [--seed 1] [--splits 2] [--epochs 60]
        [--head flat|gap] [--lr 2e-3]

Renders (in memory, from the same plans that ``python -m pipeline synth`` writes) every patient holding a rare
lesion, crops 24^3 voxels at 1 mm around each rare finding, splits patient-disjointly (60 % train), and
reports held-out 3-way accuracy (chance 0.33) of:

- ``linear_raw``: multinomial logistic regression (L2) on the raw windowed intensities;
- ``linear_radial``: the same on radial mean profiles (a rotation-invariant summary of the crop);
- ``cnn_flat`` (or ``cnn_gap``): a tiny 3D CNN (3 conv blocks, GroupNorm) trained with flip / in-plane rot90
  augmentation.

The demo wants the first two far from solved and the CNN clearly above them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.synth import RARE_TYPES, lesion_crops, plan_cohort  # noqa: E402


def window(crops: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] with the demo's window [-1000, 400]; shape kept."""
    return np.clip((crops + 1000.0) / 1400.0, 0.0, 1.0).astype(np.float32)


def radial_profiles(x: np.ndarray, max_mm: int = 16) -> np.ndarray:
    """Mean intensity in 1 mm shells around the crop centre: ``(N, D, D, D)`` -> ``(N, max_mm + 1)``."""
    c = np.arange(x.shape[1]) - (x.shape[1] - 1) / 2
    shell = np.minimum(np.sqrt(sum(a**2 for a in np.meshgrid(c, c, c, indexing="ij"))).astype(int), max_mm)
    flat, shell = x.reshape(len(x), -1), shell.ravel()
    return np.stack([flat[:, shell == s].mean(axis=1) for s in range(max_mm + 1)], axis=1)


def linear_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, weight_decay: float, steps: int = 300) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression; ``x`` is ``(N, F)``."""
    f = torch.as_tensor(x.reshape(len(x), -1))
    mu, sd = f[train].mean(0), f[train].std(0) + 1e-3
    f, t = (f - mu) / sd, torch.as_tensor(y)
    torch.manual_seed(0)
    model = nn.Linear(f.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(f[train]), t[train]).backward()
        opt.step()
    with torch.no_grad():
        return (model(f[~train]).argmax(1) == t[~train]).float().mean().item()


def tiny_cnn(classes: int, head: str = "flat") -> nn.Module:
    """Three 3x3x3 conv blocks (16-32-32/64) with GroupNorm and max pooling, then a linear head.

    ``head="flat"`` keeps the 3^3 layout of the last feature map (the findings are centred, so position means
    something); ``head="gap"`` averages it away, like the pipeline's ``conv3d`` encoder (slower to learn here).
    """
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv3d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.ReLU(), nn.MaxPool3d(2)]

    if head == "gap":
        return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                             nn.Linear(64, classes))
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 32), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(32 * 27, classes))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving: random flips of the three axes and in-plane 90-degree turns (x is ``(B, 1, Z, Y, X)``)."""
    for dim in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(dim)
    return torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(3, 4))


def train_cnn(x: np.ndarray, y: np.ndarray, train: np.ndarray, epochs: int, seed: int, head: str = "flat",
              lr: float = 2e-3) -> float:
    """Held-out accuracy of ``tiny_cnn`` trained with Adam (batch 16) on the ``train`` crops ``(N, D, D, D)``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data, target = torch.as_tensor(x).unsqueeze(1), torch.as_tensor(y)
    model = tiny_cnn(int(y.max()) + 1, head)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    idx = np.flatnonzero(train)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(idx), generator=gen).split(16):
            b = torch.as_tensor(idx[batch.numpy()])
            opt.zero_grad()
            nn.functional.cross_entropy(model(augment(data[b], gen)), target[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(data[~train]).argmax(1) == target[~train]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=600, help="cohort size to render (600: 150 crops per type)")
    ap.add_argument("--seed", type=int, default=1, help="cohort seed (the demo writes seed 0)")
    ap.add_argument("--splits", type=int, default=2, help="patient-disjoint 60/40 splits to average over")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--head", choices=["flat", "gap"], default="flat", help="CNN head (see tiny_cnn)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (extra threads only contend on 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    crops, y, groups = lesion_crops(plan_cohort(args.seed, args.patients), RARE_TYPES)
    x = window(crops)
    print(f"{len(x)} rare-type crops {x.shape[1:]} from {len(np.unique(groups))} patients "
          f"({np.bincount(y).tolist()} of {list(RARE_TYPES)}), rendered in {time.perf_counter() - start:.0f} s")
    results: dict[str, list[float]] = {"linear_raw": [], "linear_radial": [], f"cnn_{args.head}": []}
    for split in range(args.splits):
        patients = np.random.default_rng(split).permutation(np.unique(groups))
        train = np.isin(groups, patients[: int(0.6 * len(patients))])
        t0 = time.perf_counter()
        results["linear_raw"].append(max(linear_probe(x, y, train, wd) for wd in (1e-3, 1e-2, 1e-1)))
        results["linear_radial"].append(max(linear_probe(radial_profiles(x), y, train, wd, 1000)
                                            for wd in (1e-4, 1e-3, 1e-2)))
        t1 = time.perf_counter()
        results[f"cnn_{args.head}"].append(train_cnn(x, y, train, args.epochs, split, args.head, args.lr))
        print(f"split {split}: train {int(train.sum())} / test {int((~train).sum())} crops; "
              + ", ".join(f"{k} {v[-1]:.3f}" for k, v in results.items())
              + f"  (linear {t1 - t0:.0f} s, cnn {time.perf_counter() - t1:.0f} s)", flush=True)
    print("held-out 3-way accuracy (chance 0.333), mean over splits; linear probes report the best of their L2 "
          "grid on the test crops, an optimistic figure:")
    for k, v in results.items():
        print(f"  {k:<14} {np.mean(v):.3f}  (min {np.min(v):.3f}, max {np.max(v):.3f})")


if __name__ == "__main__":
    main()
