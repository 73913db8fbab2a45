"""The record every loader returns, user-facing errors, and all-or-nothing output files."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


class FewscanError(Exception):
    """An error the user can fix: the CLI prints its one-line message and exits with code 2."""


class InputError(FewscanError):
    """Bad input file or folder; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Volume:
    """An image or label volume with its world geometry.

    Attributes:
        array: voxel data of shape ``(I, J, K)`` or ``(I, J, K, T)``; scaled values (HU for CT).
        affine: ``(4, 4)`` voxel index -> world millimetres in **RAS+** (the NIfTI/nibabel convention).
        meta: provenance, e.g. ``modality``, ``series_uid``, ``source_orientation`` (axis codes of the
            stored data before canonicalisation), ``label_names`` for label maps. No patient identifiers.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def orientation(self) -> str:
        """Axis codes of the array axes, e.g. ``"RAS"``."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    def to_nifti(self) -> nib.Nifti1Image:
        """Wrap as a NIfTI image (qform and sform set to the affine)."""
        img = nib.Nifti1Image(self.array, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


def canonical(volume: Volume) -> Volume:
    """Reorder/flip the array axes so the affine is closest to RAS+; records the source orientation."""
    img = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    meta = {"source_orientation": volume.orientation, **volume.meta}
    return Volume(np.asarray(img.dataobj), img.affine, meta)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds.

    Guarantees that a failed run leaves no half-written output file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    while True:  # a fresh name; created 0666 minus the umask like any new file (mkstemp's would be 0600)
        tmp_path = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
