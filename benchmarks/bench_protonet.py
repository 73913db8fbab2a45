"""ProtoNet episode throughput: fewscan vs easyfsl 1.5.0, same Conv4, same episodes, side by side.

    python benchmarks/bench_protonet.py                 # driver: alternates one process per (impl, repeat)
    python benchmarks/bench_protonet.py --impl easyfsl  # one measurement (JSON line)

Conv4 (as in bench_maml.py: BatchNorm with batch statistics) on 1x28x28 inputs, 5-way 5-shot, 15 queries per
class. `train`: forward + cross-entropy + backward + Adam step per episode; `eval`: forward only, no grad.
fewscan embeds support and query in one encoder pass; easyfsl in two (its API): the same FLOPs.
easyfsl runs from its benchmark-only environment (`setup-peers.sh easyfsl`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_maml import PEERS, REPO, TVSHIM, conv4, tasks  # noqa: E402


def measure(impl: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    batch = tasks(args.episodes, args.ways, args.shots, args.queries)
    if impl == "fewscan":
        sys.path.insert(0, str(REPO))
        from pipeline.classification.methods.protonet import ProtoNet

        model = ProtoNet(conv4(args.ways))

        def logits(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            return model(sx, sy, qx, args.ways)
    else:
        sys.path.insert(0, str(TVSHIM))
        importlib.import_module("tvshim")  # must precede easyfsl (see setup-peers.sh)
        methods = importlib.import_module("easyfsl.methods")
        model = methods.PrototypicalNetworks(conv4(args.ways))

        def logits(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            model.process_support_set(sx, sy)
            return model(qx)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = {"impl": impl, "threads": torch.get_num_threads()}
    for mode in ("train", "eval"):
        def run(episodes: list, mode: str = mode) -> None:
            for sx, sy, qx, qy in episodes:
                if mode == "train":
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(logits(sx, sy, qx), qy).backward()
                    opt.step()
                else:
                    with torch.no_grad():
                        logits(sx, sy, qx)

        run(batch[:2])  # warm-up
        t = time.perf_counter()
        run(batch)
        out[f"{mode}_episodes_per_s"] = len(batch) / (time.perf_counter() - t)
    return out


def drive(args: argparse.Namespace) -> None:
    impls = ["fewscan", "easyfsl"]
    rows: dict[str, list[dict]] = {i: [] for i in impls}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for r in range(args.repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            python = sys.executable if impl == "fewscan" else str(PEERS / "easyfsl" / "bin" / "python")
            done = subprocess.run([python, __file__, "--impl", impl, f"--episodes={args.episodes}"],
                                  capture_output=True, text=True, check=True, cwd=REPO, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows[impl].append(row)
            print(f"repeat {r} {impl:<8} train {row['train_episodes_per_s']:.2f}/s  "
                  f"eval {row['eval_episodes_per_s']:.2f}/s", flush=True)
    summary = {impl: {k: statistics.median(x[k] for x in v) for k in ("train_episodes_per_s", "eval_episodes_per_s")}
               for impl, v in rows.items()}
    summary["train_ratio_fewscan_over_easyfsl"] = (summary["fewscan"]["train_episodes_per_s"]
                                                   / summary["easyfsl"]["train_episodes_per_s"])
    summary["eval_ratio_fewscan_over_easyfsl"] = (summary["fewscan"]["eval_episodes_per_s"]
                                                  / summary["easyfsl"]["eval_episodes_per_s"])
    print(json.dumps(summary, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["fewscan", "easyfsl"])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(measure(args.impl, args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
