"""MAML meta-iteration time and peak memory: fewscan vs learn2learn 0.2.0, side by side, on the same Conv4.

    python benchmarks/bench_maml.py                 # driver: alternates one process per (impl, repeat)
    python benchmarks/bench_maml.py --impl fewscan  # one measurement, prints a JSON line

Setup (identical for both): Conv4 (4 x [3x3 conv 64, BatchNorm with batch statistics, ReLU, 2x2 max-pool]) + a
linear 5-way head on 1x28x28 inputs; 5-way 1-shot, 15 queries per class; 5 inner steps at step size 0.4; 4 tasks
per meta-iteration; Adam outer step. Second order unless `--first-order`. Peers run from their benchmark-only
environment (`PEERS=/work/peers bash /work/shared/peers/setup-peers.sh learn2learn`), never the project's.

Cores: `--threads N` gives each process N intra-op threads; with `--task-threads N` fewscan instead runs the
tasks of the meta-batch in N threads of one intra-op thread each (`method.task_threads`), the peer keeping N
intra-op threads, so both use the same cores.

Memory: peak resident set size of the measuring process over warm-up and timed iterations, minus its RSS just
before meta-training starts (imports, model and data loaded), i.e. what meta-training itself adds; also minor page
faults per timed iteration (fresh pages the C allocator asked the kernel for).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", "/work/peers"))
TVSHIM = Path(os.environ.get("TVSHIM_DIR", "/work/shared/peers"))


def conv4(ways: int):  # noqa: ANN201 - torch imported lazily (peers' environments)
    from torch import nn

    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 64
    encoder = nn.Sequential(*layers, nn.Flatten())  # 28 -> 14 -> 7 -> 3 -> 1: 64 features
    encoder.out_dim = 64
    return encoder


def tasks(n_tasks: int, ways: int, shots: int, queries: int, size: int = 28) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(ways * shots, 1, size, size, generator=g), torch.arange(ways).repeat_interleave(shots),
             torch.randn(ways * queries, 1, size, size, generator=g), torch.arange(ways).repeat_interleave(queries))
            for _ in range(n_tasks)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(impl: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    batch = tasks(args.tasks, args.ways, args.shots, args.queries)
    if impl == "fewscan":
        sys.path.insert(0, str(REPO))
        from pipeline.classification.methods.maml import MAML

        model = MAML(conv4(args.ways), args.ways, args.steps, args.lr, args.first_order,
                     channels_last=args.channels_last)

        def step() -> None:
            if args.task_threads > 1:  # what `method.task_threads` does in pipeline/classification/train.py
                from pipeline.nn.inner import threaded_task_grads

                threaded_task_grads(model, batch, lambda m, t: (m.task_loss(*t, args.ways).loss / len(batch), None),
                                    args.task_threads)
                return
            for sx, sy, qx, qy in batch:
                (model.task_loss(sx, sy, qx, qy, args.ways).loss / len(batch)).backward()
    else:
        sys.path.insert(0, str(TVSHIM))
        import importlib

        importlib.import_module("tvshim")  # must precede learn2learn (see setup-peers.sh)
        l2l = importlib.import_module("learn2learn")

        net = nn.Sequential(conv4(args.ways), nn.Linear(64, args.ways))
        if args.peer_channels_last:  # what a learn2learn user could do by hand
            net = net.to(memory_format=torch.channels_last)
            batch = [(sx.contiguous(memory_format=torch.channels_last), sy,
                      qx.contiguous(memory_format=torch.channels_last), qy) for sx, sy, qx, qy in batch]
        model = l2l.algorithms.MAML(net, lr=args.lr, first_order=args.first_order)

        def step() -> None:
            for sx, sy, qx, qy in batch:
                learner = model.clone()
                for _ in range(args.steps):
                    learner.adapt(F.cross_entropy(learner(sx), sy))
                (F.cross_entropy(learner(qx), qy) / len(batch)).backward()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def iteration() -> None:
        opt.zero_grad(set_to_none=True)
        step()
        opt.step()

    before = rss_mb()  # imports, model and data are in; meta-training has not started
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(args.warmup):
        iteration()
    times, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.iterations):
        t, c = time.perf_counter(), time.process_time()
        iteration()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024
    return {"minor_faults_per_iteration": (usage.ru_minflt - faults) / args.iterations,
            "impl": impl, "median_s": statistics.median(times),
            "cpu_median_s": statistics.median(cpu), "min_s": min(times), "times": times,
            "peak_rss_mb": peak, "rss_before_mb": before, "peak_added_mb": max(peak, peak_before) - before,
            "threads": torch.get_num_threads(), "steps": args.steps, "first_order": args.first_order,
            "channels_last": args.channels_last, "peer_channels_last": args.peer_channels_last,
            "task_threads": args.task_threads if impl == "fewscan" else 1}


def python_for(impl: str) -> str:
    return sys.executable if impl == "fewscan" else str(PEERS / "learn2learn" / "bin" / "python")


def drive(args: argparse.Namespace) -> None:
    impls = ["fewscan", "learn2learn"] if not args.only else [args.only]
    passthrough = [f"--steps={args.steps}", f"--iterations={args.iterations}", f"--warmup={args.warmup}",
                   f"--tasks={args.tasks}", f"--lr={args.lr}"] + (["--first-order"] if args.first_order else []) \
        + (["--channels-last"] if args.channels_last else []) \
        + (["--peer-channels-last"] if args.peer_channels_last else []) \
        + [f"--task-threads={args.task_threads}"]
    rows: dict[str, list[dict]] = {i: [] for i in impls}
    for r in range(args.repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate the order too
            # with task threads, fewscan runs one intra-op thread per task thread; the peer gets `threads` intra-op
            threads = 1 if impl == "fewscan" and args.task_threads > 1 else args.threads
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            out = subprocess.run([python_for(impl), __file__, "--impl", impl, *passthrough], capture_output=True,
                                 text=True, check=True, cwd=REPO, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[impl].append(row)
            print(f"repeat {r} {impl:<12} median {row['median_s']:.3f} s  peak added {row['peak_added_mb']:.0f} MB",
                  flush=True)
    summary = {impl: {"median_of_medians_s": statistics.median(x["median_s"] for x in v),
                      "best_median_s": min(x["median_s"] for x in v),
                      "peak_added_mb": statistics.median(x["peak_added_mb"] for x in v),
                      "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in v), "repeats": len(v)}
               for impl, v in rows.items()}
    if len(impls) == 2:
        # per repeat, the two processes ran back to back: their ratio is robust to the machine's load drifting
        ratios = [f["median_s"] / p["median_s"] for f, p in zip(rows["fewscan"], rows["learn2learn"], strict=True)]
        summary["ratio_fewscan_over_l2l_per_repeat"] = ratios
        summary["ratio_fewscan_over_l2l_median"] = statistics.median(ratios)
    print(json.dumps(summary, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["fewscan", "learn2learn"], help="measure one implementation in this process")
    p.add_argument("--only", choices=["fewscan", "learn2learn"], help="driver: run just this one")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="fewscan: MAML's optional channels-last layout")
    p.add_argument("--peer-channels-last", action="store_true",
                   help="learn2learn: convert its model and inputs to channels-last by hand")
    p.add_argument("--task-threads", type=int, default=1,
                   help="fewscan: tasks of the meta-batch in this many threads (one intra-op thread each)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="driver: intra-op threads per measuring process (1: robust on a shared 2-core machine)")
    args = p.parse_args()
    if args.impl:
        print(json.dumps(measure(args.impl, args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
