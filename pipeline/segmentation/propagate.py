"""Learned label propagation (`segmentation.method: propagate`): register, warp the support masks, fuse them.

Training meta-learns the registration network (`pipeline.registration.network`, configured by the run's
`registration` section) on pairs of the training scans' **images only**: no label map is read, so no structure
is ever trained on, held out or not. Segmenting a query: each support scan is registered to it (network field,
then `registration.instance_steps` of test-time instance optimisation of the pair's field on image similarity),
its mask is warped with the field (linear interpolation of the binary mask, a soft label), and the K warped masks
are fused by locally weighted voting (`fuse`): each support counts, voxel by voxel, by how well its warped image
matches the query around that voxel. The query is foreground where the fused label exceeds 0.5.

All volumes are centre padded (or cropped) to one network grid, each side the largest training scan's rounded up
to `registration.size_divisor()`; it is stored in the run's `state.json` (`volume_size`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import ResizeWithPadOrCrop
from torch import Tensor

from datasets.volume import FewscanError
from pipeline.common import loop
from pipeline.common.config import Config, RegistrationConfig
from pipeline.common.episodes import episode_loader
from pipeline.registration.deformation import warp
from pipeline.registration.episodes import Batch, RegEpisodes
from pipeline.registration.network import Losses, RegistrationNet, model_device, predict, refine, reptile_step
from pipeline.segmentation.data import Case

FUSION_KERNEL = 5  # voxels: the window of the local image similarity that weights each support
FUSION_EPS = 1e-4  # keeps the inverse local error finite where a warped support equals the query


def network_grid(shapes: list[tuple[int, ...]], rcfg: RegistrationConfig) -> tuple[int, int, int]:
    """The network's grid: per side the largest shape, rounded up to a multiple of `rcfg.size_divisor()`."""
    d = rcfg.size_divisor()
    return tuple(int(-(-max(s[i] for s in shapes) // d) * d) for i in range(3))  # type: ignore[return-value]


def to_grid(array: np.ndarray, grid: tuple[int, ...]) -> Tensor:
    """`(I, J, K)` -> `(1, 1, *grid)` float32, centre padded with zeros or centre cropped."""
    x = torch.as_tensor(np.asarray(array, np.float32))[None]
    # a plain tensor: MONAI's MetaTensor would route every later op (the losses too) through its metadata hooks
    return ResizeWithPadOrCrop(grid)(x).as_subclass(torch.Tensor)[None].float()


def from_grid(x: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """`(1, 1, *grid)` -> `(I, J, K)` numpy: the inverse of `to_grid` (cropped-away borders come back as 0)."""
    return ResizeWithPadOrCrop(shape)(x[0].detach()).as_subclass(torch.Tensor)[0].numpy()


# --- training: image pairs of the training scans --------------------------------------------------------
class CasePairs:
    """Inter-patient (moving, fixed) image pairs of the training cases, grouped by fixed scan, for `RegEpisodes`.

    Only `Case.image` is touched. Pairs: a seeded sample of `registration.train_pairs` of all ordered pairs of
    scans from different patients.
    """

    def __init__(self, cases: list[Case], grid: tuple[int, ...], rcfg: RegistrationConfig, seed: int) -> None:
        self.images = [to_grid(c.image, grid)[0] for c in cases]  # (1, *grid) each
        self.shape = tuple(grid)
        candidates = [(m, f) for f in range(len(cases)) for m in range(len(cases))
                      if cases[m].patient_key != cases[f].patient_key]
        if not candidates:
            raise FewscanError("propagation training needs scans of at least 2 patients among the training cases")
        rng = np.random.default_rng([seed, 7])
        keep = sorted(rng.permutation(len(candidates))[: rcfg.train_pairs].tolist())
        self.pairs = [{"pair": n, "task": "images", "cases": [{"role": "moving", "image": str(candidates[i][0])},
                                                               {"role": "fixed", "image": str(candidates[i][1])}]}
                      for n, i in enumerate(keep)]

    def batch(self, indices: list[int]) -> Batch:
        """Moving and fixed images `(B, 1, *grid)`; never labels."""
        pairs = [self.pairs[i]["cases"] for i in indices]
        moving = torch.stack([self.images[int(p[0]["image"])] for p in pairs])
        fixed = torch.stack([self.images[int(p[1]["image"])] for p in pairs])
        return moving, fixed, None, None


def build_net(cfg: Config, grid: tuple[int, ...]) -> RegistrationNet:
    """The registration network on `grid`, initialised from `cfg.seed`.

    Raises:
        FewscanError: `registration.prealign: sitk` (a per-pair SimpleITK stage; use `globalnet` or `none`).
    """
    if cfg.registration.prealign == "sitk":
        raise FewscanError("segmentation.method propagate: registration.prealign sitk is not supported "
                           "(use globalnet or none)")
    torch.manual_seed(cfg.seed)
    return RegistrationNet(cfg.registration, grid)


def train_propagation(cfg: Config, session: loop.Session, train_cases: list[Case], grid: tuple[int, ...],
                      stop_at: int | None = None) -> Path:
    """Reptile (or joint) training of the registration network on the training images (no labels read)."""
    rcfg = cfg.registration
    data = CasePairs(train_cases, grid, rcfg, cfg.seed)
    model = build_net(cfg, grid).to(session.device)
    losses = Losses(rcfg, n_labels=0)  # no Dice term: there are no labels
    stream = RegEpisodes(data, cfg, cfg.train.iterations)  # type: ignore[arg-type]  # duck-typed PairData
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr) if rcfg.meta == "joint" else None
    carried: dict[str, Any] = {"inner": None}

    def batches(start: int) -> Iterator[list[Batch]]:
        stream.start = start
        return iter(episode_loader(stream, cfg.episodes.workers, cfg.episodes.prefetch))

    def step(it: int, task: list[Batch]) -> dict[str, float]:
        if opt is None:
            steps = iter(task)
            loss, carried["inner"] = reptile_step(model, losses, lambda: next(steps), rcfg.inner_steps,
                                                  cfg.train.lr, rcfg.meta_lr, carried["inner"])
            return {"loss": loss}
        model.train()
        batch = tuple(t if t is None else t.to(session.device) for t in task[0])
        total = losses(model(batch[0], batch[1]), batch)["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return {"loss": float(total.detach())}

    info = {"train_pairs": len(data.pairs), "volume_size": list(grid), "train_cases": len(train_cases)}
    return loop.run(session, loop.Task(model, batches, step, opt, state=lambda: dict(carried),
                                       load_state=carried.update, info=lambda: info,
                                       desc=f"meta-training registration ({rcfg.meta})", unit="task"), stop_at)


def load_net(cfg: Config, run_dir: Path, weights: str) -> tuple[RegistrationNet, tuple[int, ...]]:
    """A propagation run's network with `weights` loaded (eval mode) and its grid (`state.json` `volume_size`)."""
    import json

    from pipeline.common.run import load_weights, pick_device

    grid = tuple(int(v) for v in json.loads((Path(run_dir) / "state.json").read_text())["volume_size"])
    net = load_weights(build_net(cfg, grid), Path(run_dir) / weights).to(pick_device(cfg.train.device))
    return net.eval(), grid


# --- segmenting a query ----------------------------------------------------------------------------------
def fuse(labels: Tensor, images: Tensor, query: Tensor, local: bool = True) -> Tensor:
    """Locally weighted voting of K warped soft labels.

    Each support's weight at a voxel is the inverse of its warped image's mean squared difference to the query
    in a `FUSION_KERNEL`^3 window (Artaechevarria et al., IEEE TMI 2009); `local=False` gives the plain mean.

    Args:
        labels: warped soft masks `(K, 1, *S)` in [0, 1].
        images: the supports' warped images `(K, 1, *S)`.
        query: the query image `(1, 1, *S)`.

    Returns:
        The fused soft label `(1, 1, *S)`: with identical supports exactly any one of them.
    """
    if not local or labels.shape[0] == 1:
        return labels.mean(0, keepdim=True)
    error = F.avg_pool3d((images - query) ** 2, FUSION_KERNEL, stride=1, padding=FUSION_KERNEL // 2,
                         count_include_pad=False)
    weight = 1.0 / (error + FUSION_EPS)
    return (weight * labels).sum(0, keepdim=True) / weight.sum(0, keepdim=True)


@torch.no_grad()
def propagate(model: RegistrationNet, rcfg: RegistrationConfig, supports: list[tuple[np.ndarray, np.ndarray]],
              query: np.ndarray, grid: tuple[int, ...], local: bool = True) -> np.ndarray:
    """Segment one query by registering every support to it and fusing the warped masks.

    Args:
        model: the trained registration network (eval mode is set here).
        rcfg: `instance_steps` / `instance_lr` refine each pair's field (0 steps: the network's field).
        supports: `(image (I', J', K'), bool mask (I', J', K'))` pairs, each on its own prepared grid.
        query: the query image `(I, J, K)`.
        grid: the network's grid (`network_grid`).
        local: locally weighted fusion (`fuse`), else the mean of the warped masks.

    Returns:
        Bool mask `(I, J, K)`. A structure the supports hold but the query lacks comes out as whatever the
        warped masks cover (possibly empty); nothing here refuses it.
    """
    losses = Losses(rcfg, n_labels=0)
    fixed = to_grid(query, grid)
    labels, images = [], []
    for image, mask in supports:
        moving = to_grid(image, grid)
        ddf = refine(predict(model, moving, fixed), moving, fixed, losses, rcfg.instance_steps, rcfg.instance_lr,
                     model_device(model))
        labels.append(warp(to_grid(mask, grid), ddf))  # linear: a soft label, smoother borders than nearest
        images.append(warp(moving, ddf))
    fused = fuse(torch.cat(labels), torch.cat(images), fixed, local)
    return from_grid(fused, query.shape) > 0.5
