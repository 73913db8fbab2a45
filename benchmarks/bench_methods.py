"""Every classification method on one dataset: train, evaluate 1-shot and 5-shot, untrained vs trained.

For each method this writes `WORK/<method>.yaml` = `extends: DATASET_CONFIG` + the `method:` section of
`configs/classify_<method>.yaml`, then runs, one process at a time with `OMP_NUM_THREADS=1`:

    python -m pipeline train WORK/<method>.yaml --set train.device=cpu --set ... --out WORK/<method>
    python -m pipeline evaluate WORK/<method>                 # K = episodes.shots of the config (1)
    python -m pipeline evaluate WORK/<method> --set shots=5 --out WORK/<method>/report_5shot.json   # same weights

and prints a markdown table (accuracy with 95% CI for the untrained and trained weights, balanced accuracy,
macro-AUC) plus wall and CPU seconds per phase; everything is also saved to `WORK/results.json`.

Example (MedNIST, the benchmarks/README.md schedule):

    .venv/bin/python benchmarks/bench_methods.py --config configs/classify_npz.yaml --work /tmp/bm/mednist \\
        --iterations protonet=500 maml=500 --set "transforms.image_size=[28, 28]" --set method.meta_batch=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METHODS = ("protonet", "matching", "siamese", "finetune", "maml", "metasgd", "reptile")


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """Run one CLI command (1 thread), output appended to `log`; returns wall and child CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def fmt(metric: dict) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(results: dict) -> str:
    lines = ["| method | iterations | shots | untrained accuracy [95% CI] | trained accuracy [95% CI] | "
             "trained balanced acc. | untrained / trained macro-AUC |", "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        for shots, rep in sorted(r["reports"].items()):
            m, u = rep["metrics"], rep["untrained"]["metrics"]
            lines.append(f"| {method} | {r['iterations']} | {shots} | {fmt(u['accuracy'])} | {fmt(m['accuracy'])} | "
                         f"{m['balanced_accuracy']['mean']:.3f} | {u['auc']['mean']:.3f} / {m['auc']['mean']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="dataset config, e.g. configs/classify_npz.yaml")
    p.add_argument("--work", type=Path, required=True, help="folder for configs, runs, logs and results.json")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--iterations", nargs="*", default=[], metavar="METHOD=N", help="per-method train.iterations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every method (repeatable)")
    p.add_argument("--queries5", type=int, default=None, help="episodes.queries of the 5-shot evaluation")
    p.add_argument("--no-5shot", action="store_true")
    args = p.parse_args()
    iterations = {k: int(v) for k, v in (item.split("=", 1) for item in args.iterations)}
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    python = str(REPO / ".venv" / "bin" / "python")
    load = os.getloadavg()
    for method in args.methods:
        spec = yaml.safe_load((REPO / "configs" / f"classify_{method}.yaml").read_text())
        cfg_file = args.work / f"{method}.yaml"
        cfg_file.write_text(yaml.safe_dump({"extends": str(args.config.resolve()), "method": spec["method"]},
                                           sort_keys=False))
        run_dir = args.work / method
        if run_dir.exists():
            shutil.rmtree(run_dir)
        sets = ["train.device=cpu", *args.overrides]
        if method in iterations:
            sets.append(f"train.iterations={iterations[method]}")
        log = args.work / f"{method}.log"
        log.unlink(missing_ok=True)
        timing = {"train": run([python, "-m", "pipeline", "train", str(cfg_file), *[a for s in sets for a in
                                                                                     ("--set", s)],
                                "--out", str(run_dir)], log)}
        timing["evaluate_1"] = run([python, "-m", "pipeline", "evaluate", str(run_dir)], log)
        reports = {1: json.loads((run_dir / "report.json").read_text())}
        if not args.no_5shot:
            # the same weights at K=5 (their own episode set and report_shots5*.json beside the run's own)
            sets5 = ["shots=5", *([f"queries={args.queries5}"] if args.queries5 is not None else [])]
            out5 = run_dir / "report_5shot.json"
            timing["evaluate_5"] = run([python, "-m", "pipeline", "evaluate", str(run_dir), "--out", str(out5),
                                        *[a for s in sets5 for a in ("--set", s)]], log)
            reports[5] = json.loads(out5.read_text())
        state = json.loads((run_dir / "state.json").read_text())
        results[method] = {"iterations": state["iterations"], "stopped_early": state["stopped_early"],
                           "best_iteration": state["best_iteration"], "timing": timing, "overrides": sets,
                           "reports": {str(k): v for k, v in reports.items()}}
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{method}: " + ", ".join(f"{k} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU"
                                        for k, v in timing.items()), flush=True)
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(table(results))


if __name__ == "__main__":
    main()
