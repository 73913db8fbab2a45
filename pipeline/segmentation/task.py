"""The segmentation task kind's protocol (see `pipeline/__main__.py`): train, evaluate, episodes, adapt, predict."""

from __future__ import annotations

from pathlib import Path

from pipeline.segmentation.adapt import adapt as _adapt
from pipeline.segmentation.adapt import predict as _predict
from pipeline.segmentation.episodes import fixed_episodes
from pipeline.segmentation.evaluate import evaluate, summary_table
from pipeline.segmentation.train import train

__all__ = ["adapt", "evaluate", "fixed_episodes", "predict", "summary_table", "train"]


def adapt(run: Path, support: Path, out: Path, structure: str | None = None) -> str:
    """Adapt to one structure from a support CSV of image,label rows; returns the line the CLI prints."""
    summary = _adapt(run, support, out, structure)
    return (f"adapted {summary['method']} segmentation of {summary['structure']} ({summary['shots']} support "
            f"scans) -> {out}")


def predict(adapted: Path, inputs: list[Path], out: Path, centre: list[float] | None = None) -> str:
    """Segment each input; writes NIfTI (and DICOM-SEG for DICOM inputs) under `out`."""
    return "\n".join(f"{row['input']}: {row['voxels']} voxels -> {row['nifti']}"
                     + (f", {row['dicom_seg']}" if "dicom_seg" in row else "")
                     for row in _predict(adapted, inputs, out))
