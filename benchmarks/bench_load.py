"""Series load time: fewscan vs SimpleITK ImageSeriesReader and MONAI PydicomReader.

Run from the repo root: ``.venv/bin/python benchmarks/bench_load.py`` (writes the ``## Loading`` section of
benchmarks/README.md). Series: a synthetic uncompressed CT series (100 slices of 256x256, written here) and,
when the shared data is present, the 20-slice JPEG 2000 TotalSegmentator series. Each time is the median
of ``--repeats`` runs in this one process, and each table cell the median over ``--rounds`` rounds (all readers
measured in every round, so that a load change on a shared machine hits them alike); the OS file cache is warm
for every reader alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from datasets.dicom import load_series  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sitk_load(folder: Path) -> object:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def monai_loader() -> Callable[[Path], object]:
    from monai.transforms import LoadImage

    loader = LoadImage(reader="PydicomReader", image_only=True)
    return lambda folder: loader(str(folder))


def synthetic_series(root: Path) -> Path:
    from dicom_factory import write_series

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(256, 256, 100), dtype=np.uint16)
    write_series(root / "synthetic", stored, pixel_spacing=(0.7, 0.7), step=(0.0, 0.0, 1.5))
    return root / "synthetic"


def bench(name: str, folder: Path, repeats: int) -> dict[str, float | str]:
    """One round: median times (s) of every reader on one series."""
    monai_load = monai_loader()
    row: dict[str, float | str] = {"series": name}
    row["fewscan"] = median_time(lambda: load_series(folder), repeats)
    row["simpleitk"] = median_time(lambda: sitk_load(folder), repeats)
    row["monai_pydicom"] = median_time(lambda: monai_load(folder), repeats)
    return row


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Per series and column, the median over rounds."""
    rows = []
    for same in zip(*rounds, strict=True):
        row: dict[str, float | str] = {"series": same[0]["series"]}
        for key in same[0]:
            if key != "series":
                row[key] = statistics.median(r[key] for r in same)
        rows.append(row)
    return rows


def table(rows: list[dict], command: str, n_rounds: int, load: str) -> str:
    lines = [
        "## Loading",
        "",
        f"Measured by `{command}` on this machine ({os.cpu_count()} CPUs, shared; {load}).",
        f"Each figure is the median over {n_rounds} rounds of the median of repeated loads in one process",
        "(OS file cache warm for all readers alike). Ratios > 1 favour fewscan.",
        "",
        "| series | fewscan (s) | SimpleITK (s) | MONAI PydicomReader (s) | SimpleITK / fewscan | MONAI / fewscan |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['series']} | {r['fewscan']:.3f} | {r['simpleitk']:.3f} | {r['monai_pydicom']:.3f} "
            f"| {r['simpleitk'] / r['fewscan']:.2f} | {r['monai_pydicom'] / r['fewscan']:.2f} |"
        )
    lines += ["", "Goal: SimpleITK / fewscan >= 1 (no slower than SimpleITK).", ""]
    return "\n".join(lines)


def write_section(readme: Path, section: str) -> None:
    """Replace (or append) the ``## Loading`` section, keeping every other section intact."""
    section = section.rstrip("\n") + "\n\n"
    text = readme.read_text() if readme.is_file() else "# Benchmarks\n\n"
    start = text.find("## Loading")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="measure everything this many times; report medians")
    default_data = Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/README.md alone")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # MONAI's per-load notices
    warnings.filterwarnings("ignore")
    before = load_text()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        series = [("synthetic CT, 100 x 256x256, uncompressed", synthetic_series(tmp_path))]
        j2k = args.data / "totalsegmentator_example" / "example_ct_dicom"
        if j2k.is_dir():
            series.append(("TotalSegmentator CT, 20 x 512x512, JPEG 2000", j2k))
        for i in range(args.rounds):
            rounds.append([bench(name, folder, args.repeats) for name, folder in series])
            print(f"round {i + 1}: " + "; ".join(
                f"{r['series'].split(',')[0]}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "series")
                for r in rounds[-1]), flush=True)
    load = f"{before} at the start, {load_text()} at the end"
    section = table(combine(rounds), "python benchmarks/bench_load.py", args.rounds, load)
    print(section)
    if not args.no_write:
        write_section(REPO / "benchmarks" / "README.md", section)


if __name__ == "__main__":
    main()
