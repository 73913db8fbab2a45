"""The record every loader returns, user-facing errors, and all-or-nothing output files."""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once (import time, one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds.

    Guarantees that a failed run leaves no half-written output file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file 0600; give the output the permissions any other new file would get (umask)
        tmp_path.chmod(0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
