"""Episode throughput for the three task kinds: episodes/s with 0 and 2 DataLoader workers, and the share of a
training step spent waiting for data.

    .venv/bin/python benchmarks/bench_episodes.py [--data ../shared/data] [--episodes 200] [--steps 60]
        [--kinds classification segmentation registration]

Classification steps: a Conv4-style encoder, ProtoNet loss, forward + backward + Adam. Segmentation: the ready
config `configs/segment_decathlon_ssl.yaml` (2D prototype U-Net, self-supervised supervoxel episodes with
augmentation) on a synthetic Decathlon folder. Registration: `configs/register_decathlon.yaml` (one Reptile task:
3 inner steps of 2 pairs each) on a synthetic Decathlon folder.

Sources: MedNIST (`mednist/mednist_64px_cap1000.npz`, 2D 64x64) and the synthetic TCIA cohort (24^3 crops around
each finding; written into a temporary folder first). Each is measured without and with augmentation (the random
part runs in the workers). Figures depend on machine load; run on an otherwise idle machine for the README.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.classification.data import Items, open_source  # noqa: E402
from pipeline.classification.episodes import EpisodeDataset  # noqa: E402
from pipeline.common.config import validate  # noqa: E402
from pipeline.common.episodes import EpisodeStream, episode_loader  # noqa: E402
from pipeline.nn.encoders import conv_encoder  # noqa: E402
from transforms.augment import build_augmenter  # noqa: E402
from transforms.config import AugmentConfig  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 5


def mednist_items(data: Path) -> Items:
    cfg = validate({"data": {"source": "npz", "root": str(data / "mednist" / "mednist_64px_cap1000.npz")}})
    return open_source(cfg).items()


def synth_items(tmp: Path, patients: int) -> Items:
    from datasets.synth import write_cohort

    write_cohort(tmp / "cohort", seed=0, n_patients=patients)
    cfg = validate({"data": {"source": "tcia", "root": str(tmp / "cohort")}})
    return open_source(cfg).items()


def dataset(items: Items, augment: bool, length: int | None) -> EpisodeDataset:
    """N-way K-shot Q-query over every class with enough items (N capped by how many there are)."""
    aug = build_augmenter(AugmentConfig(enabled=True), items.x.ndim - 2) if augment else None
    shots, queries = SHOTS if items.x.ndim == 4 else 2, QUERIES if items.x.ndim == 4 else 3  # small cohort: fewer
    usable = sorted(c for c in set(items.labels) if items.labels.count(c) >= 2 * (shots + queries))
    return EpisodeDataset(items.x, items.labels, items.groups, usable, min(WAYS, len(usable)), shots, queries,
                          seed=0, augment=aug, length=length)


def episodes_per_second(items: Items, workers: int, augment: bool, n: int) -> float:
    """Episodes/s of the loader alone (worker start-up excluded: the first episode is not timed)."""
    it = iter(episode_loader(dataset(items, augment, None), workers=workers, prefetch=4))
    next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - start)


def wait_share(items: Items, workers: int, augment: bool, steps: int) -> tuple[float, float]:
    """(share of step time spent waiting for the next episode, ms per step) for a Conv4-style ProtoNet step."""
    torch.manual_seed(0)
    encoder = conv_encoder(items.x.ndim - 2, items.x.shape[1], [32, 32, 32, 32], norm_groups=8)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    it = iter(episode_loader(dataset(items, augment, None), workers=workers, prefetch=4))
    for sx, sy, qx, qy in itertools.islice(it, 2):  # warm-up: worker start, first allocations
        _step(encoder, opt, sx, sy, qx, qy)
    wait = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        sx, sy, qx, qy = next(it)
        t1 = time.perf_counter()
        _step(encoder, opt, sx, sy, qx, qy)
        wait += t1 - t0
        total += time.perf_counter() - t0
    return wait / total, 1000 * total / steps


def _step(encoder: torch.nn.Module, opt: torch.optim.Optimizer, sx: torch.Tensor, sy: torch.Tensor,
          qx: torch.Tensor, qy: torch.Tensor) -> None:
    ways = int(sy.max()) + 1
    emb = encoder(torch.cat([sx, qx]))
    protos = torch.stack([emb[: len(sx)][sy == k].mean(0) for k in range(ways)])
    loss = F.cross_entropy(-torch.cdist(emb[len(sx):], protos) ** 2, qy)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# --- segmentation and registration: the training streams and steps of the ready configs --------------------------
def timed_stream(stream_fn: Callable[[], EpisodeStream], step: Callable[[Any], None] | None, workers: int,
                 n: int) -> tuple[float, float]:
    """(episodes/s, share of step time waiting for data) over `n` episodes after one untimed warm-up episode;
    without `step` the loader alone is timed (share 0)."""
    it = iter(episode_loader(stream_fn(), workers=workers, prefetch=4))
    first = next(it)
    if step is not None:
        step(first)
    wait = total = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        episode = next(it)
        t1 = time.perf_counter()
        if step is not None:
            step(episode)
        wait += t1 - t0
        total += time.perf_counter() - t0
    return n / total, wait / total


def segmentation_bench(tmp: Path, cases: int, overrides: tuple[str, ...] = ()
                       ) -> tuple[Callable[[], EpisodeStream], Callable[[Any], None]]:
    from monai.losses import DiceCELoss

    from datasets.synth_decathlon import write_synthetic_organs
    from pipeline.common.config import load_config
    from pipeline.segmentation.data import load_cases, split_structures
    from pipeline.segmentation.episodes import SegEpisodes, precompute_supervoxels
    from pipeline.segmentation.train import build_model

    if not (tmp / "seg" / "dataset.json").is_file():
        write_synthetic_organs(tmp / "seg", n_cases=cases, shape=(40, 50, 40), seed=0)
    cfg = load_config(REPO / "configs" / "segment_decathlon_ssl.yaml", [f"data.root={tmp / 'seg'}", *overrides])
    loaded = load_cases(cfg)
    precompute_supervoxels(loaded, cfg.segmentation, workers=2)
    split = split_structures(loaded, cfg.segmentation.held_out)
    model, loss_fn = build_model(cfg), DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(ep: Any) -> None:
        sx, sm, qx, qm = ep
        loss = loss_fn(model(sx, sm, qx), qm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return lambda: SegEpisodes(loaded, cfg, split, length=10**9), step


def registration_bench(tmp: Path, cases: int) -> tuple[Callable[[], EpisodeStream], Callable[[Any], None]]:
    from datasets.synth_decathlon import write_synthetic_subjects
    from pipeline.common.config import load_config
    from pipeline.registration.episodes import PairData, RegEpisodes, fixed_pairs
    from pipeline.registration.network import Losses, reptile_step
    from pipeline.registration.train import build_net, n_labels

    write_synthetic_subjects(tmp / "reg", n_cases=cases, shape=(40, 50, 40), seed=0)
    cfg = load_config(REPO / "configs" / "register_decathlon.yaml", [f"data.root={tmp / 'reg'}"])
    pairs = fixed_pairs(cfg, "train")
    data = PairData(cfg, pairs)
    model, losses = build_net(cfg, data.shape), Losses(cfg.registration, n_labels(pairs))
    state: dict[str, Any] = {"inner": None}

    def step(batches: Any) -> None:
        steps = iter(batches)
        _, state["inner"] = reptile_step(model, losses, lambda: next(steps), cfg.registration.inner_steps,
                                         cfg.train.lr, cfg.registration.meta_lr, state["inner"])

    return lambda: RegEpisodes(data, cfg, length=10**9), step


def volume_kinds(kinds: list[str], episodes: int, steps: int) -> None:
    print("\n| task kind | workers | episodes/s (loader) | steps/s (training) | data wait share |")
    print("|---|---|---|---|---|")
    seg3d = functools.partial(segmentation_bench, overrides=("segmentation.mode=3d", "segmentation.crop=[32,32,32]"))
    makers = {"segmentation": (segmentation_bench, 60), "segmentation-3d": (seg3d, 60),
              "registration": (registration_bench, 30)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            if kind not in makers:
                continue  # classification: below
            maker, cases = makers[kind]
            t0 = time.perf_counter()
            stream_fn, step = maker(Path(tmp), cases)
            print(f"({kind}: {cases} synthetic volumes prepared in {time.perf_counter() - t0:.1f} s)", flush=True)
            for workers in (0, 2):
                rate, _ = timed_stream(stream_fn, None, workers, episodes)
                step_rate, share = timed_stream(stream_fn, step, workers, steps)
                print(f"| {kind} | {workers} | {rate:.1f} | {step_rate:.2f} | {100 * share:.0f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" /
                                                                           "data")))
    parser.add_argument("--episodes", type=int, default=200, help="episodes timed per loader setting")
    parser.add_argument("--steps", type=int, default=60, help="training steps timed per setting")
    parser.add_argument("--patients", type=int, default=24, help="synthetic cohort size")
    parser.add_argument("--kinds", nargs="+",
                        default=["classification", "segmentation", "segmentation-3d", "registration"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: all cpus)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2)))
    volume_kinds(args.kinds, args.episodes // 4, args.steps // 4)
    if "classification" not in args.kinds:
        return
    sources: dict[str, Items] = {}
    if (args.data / "mednist" / "mednist_64px_cap1000.npz").is_file():
        sources["mednist 64x64"] = mednist_items(args.data)
    else:
        print(f"mednist not found under {args.data}: skipped")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sources["synthetic 24^3 crops"] = synth_items(Path(tmp), args.patients)
        print(f"synthetic cohort: {args.patients} patients written and cropped in {time.perf_counter() - t0:.1f} s")
    print(f"2D: {WAYS}-way {SHOTS}-shot {QUERIES}-query; 3D: up to {WAYS}-way 2-shot 3-query; torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}")
    print("| source | items | ways | augment | workers | episodes/s (loader) | step ms | data wait share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, items in sources.items():
        for augment in (False, True):
            for workers in (0, 2):
                eps = episodes_per_second(items, workers, augment, args.episodes if not augment else args.episodes // 4)
                share, ms = wait_share(items, workers, augment, args.steps)
                ways = dataset(items, False, 1).sampler.ways
                print(f"| {name} | {len(items.labels)} | {ways} | {'yes' if augment else 'no'} | {workers} | {eps:.0f} "
                      f"| {ms:.0f} | {100 * share:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
