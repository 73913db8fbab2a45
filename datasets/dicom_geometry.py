"""Plan volumes from frames: split into stacks, order by position (and time), check and fix the slice grid.

A *stack* is a set of planes that share orientation, size, pixel spacing, echo and image type. Its planes are
ordered along the slice normal; when every position holds the same number ``T > 1`` of planes the stack is a
4D (multi-volume) series, ordered in time by temporal position / acquisition / instance number, as dcm2niix
does. Irregular grids (missing slices, non-uniform spacing, gantry tilt) are refused with a message naming
the problem, or resampled onto a regular orthogonal grid when asked (``irregular="resample"``), never silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from datasets.dicom_frames import Frame
from datasets.volume import InputError

log = logging.getLogger(__name__)

POSITION_TOL_MM = 0.01  # planes closer than this along the normal share a position
IRREGULAR_CHOICES = ("error", "resample")


@dataclass
class Stack:
    """Frames of one volume (3D or 4D) laid out as ``grid[position][volume]``.

    Attributes:
        key: split key shared by all its frames.
        grid: ``K`` positions (ascending along `normal`) x ``T`` frames each (time order).
        positions: ``(K,)`` distance of each position along `normal` (mm, LPS).
        normal: unit slice normal ``row_dir x col_dir`` (LPS).
        issues: human-readable grid problems (missing slices, non-uniform spacing, gantry tilt).
    """

    key: str
    grid: list[list[Frame]]
    positions: np.ndarray
    normal: np.ndarray
    issues: list[str] = field(default_factory=list)

    @property
    def first(self) -> Frame:
        return self.grid[0][0]

    @property
    def n_volumes(self) -> int:
        return len(self.grid[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Stored array shape ``(columns, rows, K)`` or ``(columns, rows, K, T)``."""
        base = (self.first.cols, self.first.rows, len(self.grid))
        return base if self.n_volumes == 1 else (*base, self.n_volumes)

    @property
    def iop(self) -> np.ndarray:
        return np.asarray(self.first.iop, float).reshape(2, 3)

    def origins(self) -> np.ndarray:
        """``(K, 3)`` ImagePositionPatient of each position (first volume), LPS mm."""
        return np.asarray([col[0].ipp for col in self.grid], float)

    def lateral(self) -> np.ndarray:
        """``(K, 3)`` in-plane offset of each position's origin from the first one's normal line (tilt)."""
        rel = self.origins() - self.origins()[0]
        return rel - np.outer(rel @ self.normal, self.normal)

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel ``(column, row, slice)`` -> LPS mm, slice axis from first to last origin (as acquired)."""
        f = self.first
        iop, spacing = self.iop, f.spacing
        origins = self.origins()
        if len(origins) > 1:
            step = (origins[-1] - origins[0]) / (len(origins) - 1)
        else:
            step = self.normal * (f.thickness or 1.0)
        aff = np.eye(4)
        aff[:3, 0] = iop[0] * spacing[1]  # along a row: next column, PixelSpacing[1] apart
        aff[:3, 1] = iop[1] * spacing[0]  # down a column: next row, PixelSpacing[0] apart
        aff[:3, 2] = step
        aff[:3, 3] = origins[0]
        return aff

    def describe(self) -> str:
        f = self.first
        n = len(self.grid) * self.n_volumes
        return f"{'x'.join(map(str, self.shape))} ({n} planes, {_plane_name(self.iop)}, key {f.stack})"


def plan_stacks(frames: list[Frame], where: Path) -> list[Stack]:
    """Split frames into stacks and lay each out as positions x volumes.

    Raises:
        InputError: a stack whose positions hold unequal numbers of planes (incomplete volumes).
    """
    by_key: dict[str, list[Frame]] = {}
    for f in frames:
        by_key.setdefault(f.stack, []).append(f)
    stacks = [_plan_one(key, items, where) for key, items in by_key.items()]
    stacks.sort(key=lambda s: (-len(s.grid) * s.n_volumes, s.key))
    return stacks


def _plan_one(key: str, frames: list[Frame], where: Path) -> Stack:
    iop = np.asarray(frames[0].iop, float).reshape(2, 3)
    normal = np.cross(iop[0], iop[1])
    normal /= np.linalg.norm(normal)
    dist = np.asarray([normal @ np.asarray(f.ipp, float) for f in frames])
    order = np.argsort(dist, kind="stable")
    grid: list[list[Frame]] = []
    positions: list[float] = []
    for i in order:
        if positions and abs(dist[i] - positions[-1]) < POSITION_TOL_MM:
            grid[-1].append(frames[i])
        else:
            grid.append([frames[i]])
            positions.append(float(dist[i]))
    counts = sorted({len(col) for col in grid})
    if len(counts) > 1:
        raise InputError(where, f"incomplete volumes: slice positions hold {counts[0]} to {counts[-1]} images "
                         f"({len(grid)} positions, {len(frames)} images; missing or duplicated files)")
    for col in grid:
        col.sort(key=lambda f: (f.order, f.file, f.index))
        _check_duplicates(col, where)
    stack = Stack(key, grid, np.asarray(positions), normal)
    stack.issues = grid_issues(stack)
    return stack


def _check_duplicates(col: list[Frame], where: Path) -> None:
    """Several planes at one position are volumes of a time series only if their order keys differ."""
    keys = [f.order for f in col]
    if len(set(keys)) < len(keys):
        raise InputError(where, f"{len(keys)} images share position and acquisition keys (duplicate files?), "
                         f"e.g. {Path(col[0].file).name} and {Path(col[1].file).name}")


def grid_issues(stack: Stack) -> list[str]:
    """Missing slices, non-uniform spacing and gantry tilt of a stack (empty when regular)."""
    issues = []
    gaps = np.diff(stack.positions)
    if len(gaps) > 1:
        small, large = float(gaps.min()), float(gaps.max())
        if large - small > max(POSITION_TOL_MM, 1e-3 * float(np.median(gaps))):
            ratios = gaps / small
            missing = int(np.round(ratios).sum() - len(gaps))
            if missing > 0 and np.allclose(ratios, np.round(ratios), atol=0.05):
                issues.append(f"{missing} missing slice(s) (gaps of {small:.3g} to {large:.3g} mm)")
            else:
                issues.append(f"non-uniform slice spacing ({small:.4g} to {large:.4g} mm)")
    if len(stack.grid) > 1:
        lateral = np.linalg.norm(stack.lateral(), axis=1)
        along = np.abs(stack.positions - stack.positions[0])
        k = int(np.argmax(lateral))
        if lateral[k] > POSITION_TOL_MM and lateral[k] > 1e-3 * along[k]:
            angle = float(np.degrees(np.arctan2(lateral[k], along[k])))
            issues.append(f"gantry tilt of {angle:.2f} degrees")
    return issues


def regularise(
    array: np.ndarray, stack: Stack, irregular: str, where: Path, order: int = 1
) -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(array, affine_lps, note)`` on a regular grid, or refuse.

    Args:
        array: ``(columns, rows, K[, T])`` float32 in stack order.
        stack: its plan (positions, origins, issues).
        irregular: ``"error"`` refuses an irregular grid; ``"resample"`` removes gantry tilt (in-plane shift
            of each slice, linear) and resamples along the normal (linear) at the largest spacing not above
            the smallest gap that divides the whole extent, so both end slices are kept.
        where: path named in errors.
        order: interpolation order, 1 (linear) for images, 0 (nearest) for labels.

    Returns:
        The (possibly resampled) array, its LPS affine, and a note on what was done ('' when nothing).
    """
    if irregular not in IRREGULAR_CHOICES:
        raise ValueError(f"irregular must be one of {IRREGULAR_CHOICES}, not {irregular!r}")
    if not stack.issues:
        return array, stack.affine_lps(), ""
    problems = "; ".join(stack.issues)
    if irregular == "error":
        raise InputError(where, f"irregular slice grid: {problems}; pass --irregular resample (irregular="
                         f"'resample') to resample onto a regular grid, or fix the series")
    f = stack.first
    iop, spacing = stack.iop, f.spacing
    fill = float(array.min()) if array.size and order else 0.0
    lateral = stack.lateral()
    if np.abs(lateral).max() > POSITION_TOL_MM:
        # the slice at position k was acquired shifted in-plane by lateral[k]: sample it back onto the
        # orthogonal column through the first slice's origin
        array = array.copy()
        for k, off in enumerate(lateral):
            shift = ((off @ iop[0]) / spacing[1], (off @ iop[1]) / spacing[0])  # output[x] = input[x - shift]
            for t in range(array.shape[3] if array.ndim == 4 else 1):
                index = (slice(None), slice(None), k) + ((t,) if array.ndim == 4 else ())
                array[index] = ndimage.shift(array[index], shift, order=order, mode="constant", cval=fill)
    pos = stack.positions - stack.positions[0]
    gaps = np.diff(pos)
    step = float(gaps.min()) if len(gaps) else (f.thickness or 1.0)
    if len(gaps) > 1 and gaps.max() - gaps.min() > POSITION_TOL_MM:
        # the largest spacing <= the smallest gap that divides the extent: both end slices are kept
        n_steps = int(np.ceil(pos[-1] / step - 1e-3))
        step = float(pos[-1] / n_steps)
        target = np.arange(n_steps + 1) * step
        upper = np.clip(np.searchsorted(pos, target, side="right"), 1, len(pos) - 1)
        w = ((target - pos[upper - 1]) / (pos[upper] - pos[upper - 1])).astype(np.float32)
        if order == 0:
            array = array[:, :, np.where(w < 0.5, upper - 1, upper)]
        else:
            shape = (1, 1, -1) + ((1,) if array.ndim == 4 else ())
            array = array[:, :, upper - 1] * (1 - w.reshape(shape)) + array[:, :, upper] * w.reshape(shape)
    aff = np.eye(4)
    aff[:3, 0] = iop[0] * spacing[1]
    aff[:3, 1] = iop[1] * spacing[0]
    aff[:3, 2] = stack.normal * step
    aff[:3, 3] = stack.origins()[0]
    note = f"resampled to a regular {step:.4g} mm orthogonal grid because of: {problems}"
    log.warning("%s: %s", where, note)
    return (array.astype(np.float32) if order else array), aff, note


def _plane_name(iop: np.ndarray) -> str:
    normal = np.abs(np.cross(iop[0], iop[1]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]
