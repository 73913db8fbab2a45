"""Hostile files (issue #19): seeded byte-mutation fuzzing of the readers, and the memory bombs' time and peak RSS.

    .venv/bin/python benchmarks/fuzz_loaders.py [--per-seed 2000] [--seed 0]

Fuzzing: `--per-seed` mutants of each of the 5 seed files of `tests/fuzz_harness.py` (2 DICOM, 2 NIfTI, 1 MHA),
each loaded through the reader a command reaches; prints the outcome counts and every exception that is not the
project's input error (the goal: none). Bombs: each file of `write_bombs` is read in its own process, which
reports its wall time and peak RSS (the goal: refused in under 1 s and 200 MB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

ONE = """
import json, resource, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from fuzz_harness import read_bomb
from datasets.volume import FewscanError
from pathlib import Path
start = time.perf_counter()
try:
    read_bomb(Path({path!r}))
    outcome = "accepted"
except FewscanError as err:
    outcome = "refused: " + str(err).split(": ", 1)[-1][:90]
print(json.dumps({{"seconds": time.perf_counter() - start, "outcome": outcome,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    from fuzz_harness import fuzz, write_bombs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-seed", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = fuzz(Path(tmp) / "fuzz", args.per_seed, args.seed)
        print(f"fuzzing: {sum(result.counts.values())} mutants, {dict(result.counts)}")
        for key, n in result.findings.most_common():
            print(f"  {n} x {key}: {result.examples[key]}")
        print("| bomb | outcome | s (in-process read) | peak RSS MB (whole process) |\n|---|---|---|---|")
        for name, path in write_bombs(Path(tmp) / "bombs").items():
            code = ONE.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {row['outcome']} | {row['seconds']:.3f} | {row['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
