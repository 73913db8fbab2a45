"""One record per 2D image plane of a DICOM file: single-frame, Siemens mosaic tile, or enhanced multi-frame frame.

Frames carry only header facts (geometry, scaling, split and ordering keys), so the same planning code serves
the loader (which then decodes pixels) and the indexer (which never does, and caches frames as JSON).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from datasets.guard import MAX_FRAMES, check_size
from datasets.volume import InputError

NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "SEG", "REG", "DOC"}


@dataclass
class Frame:
    """Header facts of one image plane.

    Attributes:
        file: source file path.
        index: frame number in a multi-frame file, tile number in a mosaic, 0 otherwise.
        rows, cols: plane size in pixels.
        iop: ImageOrientationPatient (row direction, column direction; LPS).
        ipp: ImagePositionPatient of the plane's first pixel (LPS mm).
        spacing: PixelSpacing (between rows, between columns) in mm.
        slope, intercept: modality rescale of this plane.
        stack: split key; planes with different keys never share a volume (orientation, size, echo, type).
        order: sort key among planes at the same position (temporal position, acquisition, instance ...).
        mosaic: tiles per mosaic row (0: not a mosaic).
        thickness: SpacingBetweenSlices or SliceThickness (mm), for lone planes; 0 when unknown.
        assumed: the file has no patient geometry; an identity orientation at the origin was assumed.
    """

    file: str
    index: int
    rows: int
    cols: int
    iop: tuple[float, ...]
    ipp: tuple[float, ...]
    spacing: tuple[float, float]
    slope: float
    intercept: float
    stack: str
    order: tuple[float, ...]
    mosaic: int = 0
    thickness: float = 0.0
    assumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Frame:
        return cls(**{**data, "iop": tuple(data["iop"]), "ipp": tuple(data["ipp"]),
                      "spacing": tuple(data["spacing"]), "order": tuple(data["order"])})


def is_image(ds: Dataset) -> bool:
    """True for datasets carrying a pixel matrix (not RTSTRUCT, SEG, SR, ...)."""
    if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
        return False
    return "Rows" in ds and ("PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
                             or ds.get("NumberOfFrames") is not None or "ImagePositionPatient" in ds)


def frames_of(ds: Dataset, file: Path) -> list[Frame]:
    """All image planes of one image dataset (header only; pixels are not touched).

    Raises:
        InputError: the dataset lacks the plane geometry needed to place it in space.
    """
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, file)
    iop, ipp, spacing, assumed = _geometry(ds, file)
    slope, intercept = _rescale(ds)
    if "DoseGridScaling" in ds:  # RTDOSE: stored integers times the grid scaling give Gy
        slope *= _num(ds.DoseGridScaling) or 1.0
    rows, cols = int(ds.Rows), int(ds.Columns)
    image_type = "\\".join(str(v) for v in ds.get("ImageType", []) or [])
    stack = _stack_key(iop, rows, cols, spacing, _num(ds.get("EchoNumbers")), image_type)
    order = (_num(ds.get("TemporalPositionIdentifier")), _num(ds.get("AcquisitionNumber")),
             _num(ds.get("TriggerTime")), _num(ds.get("DiffusionBValue")), _num(ds.get("InstanceNumber")))
    n_frames = checked_frames(ds, file, int(ds.get("NumberOfFrames", 1) or 1), rows, cols)
    n_mosaic = mosaic_count(ds)
    base = {"file": str(file), "iop": tuple(iop.ravel()), "spacing": tuple(spacing), "slope": slope,
            "intercept": intercept, "thickness": _thickness(ds), "assumed": assumed}
    if n_mosaic:
        return _mosaic_frames(ds, n_mosaic, rows, cols, iop, ipp, spacing, stack, order, base)
    # legacy multi-frame without functional groups (NM, RTDOSE, stripped enhanced): frames along the normal
    normal = cross(iop[0], iop[1])
    offsets = [float(v) for v in ds.get("GridFrameOffsetVector") or []]
    if len(offsets) != n_frames:
        step = _num(ds.get("SpacingBetweenSlices")) or _thickness(ds) or 1.0
        offsets = [i * step for i in range(n_frames)]
    return [Frame(index=i, rows=rows, cols=cols, ipp=tuple(ipp + offsets[i] * normal), stack=stack,
                  order=(*order, float(i)), **base) for i in range(n_frames)]


def checked_frames(ds: Dataset, file: Path, n_frames: int, rows: int, cols: int) -> int:
    """`n_frames`, once it is plausible: at most `MAX_FRAMES`, within the memory limit as float32, and, for native
    pixel data, within the bytes the file holds (a 10 KB file claiming 10^9 frames is refused before one Frame
    object is built).

    Raises:
        InputError: naming the file and the declared count.
    """
    if not 0 < n_frames <= MAX_FRAMES:
        raise InputError(file, f"declares NumberOfFrames {n_frames} (expected 1 to {MAX_FRAMES})")
    check_size(file, (n_frames, rows, cols), 4, "DICOM pixel array")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    native = syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    stored = n_frames * rows * cols * int(ds.get("BitsAllocated", 8) or 8) // 8
    size = Path(file).stat().st_size if Path(file).is_file() else None
    if native and size is not None and stored > 2 * size + 4096:  # bit-packed or odd files get slack
        raise InputError(file, f"declares {n_frames} frames of {rows}x{cols} ({stored} bytes of pixel data) but "
                         f"the file holds {size} bytes")
    return n_frames


def mosaic_count(ds: Dataset) -> int:
    """Slices in a Siemens mosaic: private (0019,100A) NumberOfImagesInMosaic, else the CSA header; 0 if none."""
    if "MOSAIC" not in [str(v).upper() for v in ds.get("ImageType", []) or []]:
        return 0
    elem = ds.get((0x0019, 0x100A))
    if elem is not None and elem.value not in (None, b"", ""):
        value = elem.value
        if isinstance(value, bytes):
            value = int.from_bytes(value[:2], "little")
        return int(value)
    csa = _csa()
    n = csa.get_n_mosaic(csa.get_csa_header(ds, "image") or {}) if csa else None
    if not n:
        raise InputError(ds.filename or "?", "Siemens mosaic without NumberOfImagesInMosaic (0019,100A)")
    return int(n)


def _mosaic_frames(ds, n_mosaic, rows, cols, iop, ipp, spacing, stack, order, base) -> list[Frame]:
    """Tiles of a Siemens mosaic; ImagePositionPatient is that of the whole mosaic's first pixel."""
    per_row = math.ceil(math.sqrt(n_mosaic))
    t_rows, t_cols = rows // per_row, cols // per_row
    # centre of the mosaic and centre of a tile coincide in space: shift the origin by the size difference
    origin = ipp + iop[0] * spacing[1] * (cols - t_cols) / 2 + iop[1] * spacing[0] * (rows - t_rows) / 2
    normal = _siemens_normal(ds, iop)
    step = _num(ds.get("SpacingBetweenSlices")) or _thickness(ds)
    return [Frame(index=i, rows=t_rows, cols=t_cols, ipp=tuple(origin + i * step * normal), mosaic=per_row,
                  stack=stack + f"|mosaic{n_mosaic}", order=order, **base) for i in range(n_mosaic)]


def _siemens_normal(ds: Dataset, iop: np.ndarray) -> np.ndarray:
    """Slice order direction of a mosaic: CSA SliceNormalVector when present (it may oppose row x col)."""
    normal = np.cross(iop[0], iop[1])
    try:
        csa = _csa()
        header = csa.get_csa_header(ds, "image")
        csa_normal = csa.get_slice_normal(header) if header else None
    except Exception:  # a malformed private header must not stop the load; fall back to row x col
        csa_normal = None
    if csa_normal is not None and np.dot(normal, np.asarray(csa_normal, float)) < 0:
        normal = -normal
    return normal


def _csa():  # noqa: ANN202 - the nibabel.nicom.csareader module
    """nibabel's Siemens CSA header reader, imported without its "experimental readers" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


def _enhanced_frames(ds: Dataset, file: Path) -> list[Frame]:
    """Frames of an enhanced (functional-group) multi-frame image."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = checked_frames(ds, file, int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame)),
                              int(ds.Rows), int(ds.Columns))
    if len(per_frame) != n_frames:
        raise InputError(file, f"{n_frames} frames but {len(per_frame)} per-frame functional groups")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = []
    for i, group in enumerate(per_frame):
        def item(seq: str, g: Dataset = group) -> Dataset:
            found = g.get(seq) or shared.get(seq)
            return found[0] if found else Dataset()

        try:
            iop = np.asarray([float(v) for v in item("PlaneOrientationSequence").ImageOrientationPatient]).reshape(2, 3)
            ipp = np.asarray([float(v) for v in item("PlanePositionSequence").ImagePositionPatient])
            measures = item("PixelMeasuresSequence")
            spacing = np.asarray([float(v) for v in measures.PixelSpacing])
        except (AttributeError, ValueError, TypeError) as err:
            raise InputError(file, f"frame {i + 1}: missing plane geometry in functional groups ({err})") from err
        scale = item("PixelValueTransformationSequence")
        slope, intercept = _rescale(scale if "RescaleSlope" in scale else ds)
        content = item("FrameContentSequence")
        echo = _num(item("MREchoSequence").get("EffectiveEchoTime"))
        frame_type = "\\".join(str(v) for v in (item("MRImageFrameTypeSequence").get("FrameType")
                                                or item("CTImageFrameTypeSequence").get("FrameType")
                                                or ds.get("ImageType") or []))
        stack = _stack_key(iop, rows, cols, spacing, echo, frame_type) + f"|stack{content.get('StackID', '')}"
        dims = [float(v) for v in (content.get("DimensionIndexValues") or [])]
        if isinstance(content.get("DimensionIndexValues"), int | float):
            dims = [float(content.DimensionIndexValues)]
        order = (_num(content.get("TemporalPositionIndex")), *dims, float(i))
        thickness = _num(measures.get("SpacingBetweenSlices")) or _num(measures.get("SliceThickness"))
        frames.append(Frame(str(file), i, rows, cols, tuple(iop.ravel()), tuple(ipp), tuple(spacing), slope,
                            intercept, stack, order, 0, thickness, False))
    return frames


def _geometry(ds: Dataset, file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(iop (2, 3), ipp (3,), pixel spacing (2,), assumed)`` of a classic image.

    Images without patient geometry (secondary captures, stripped files) get an identity orientation at
    the origin with PixelSpacing, else ImagerPixelSpacing, else 1 mm, as dcm2niix does; ``assumed`` says so.
    """
    if "ImageOrientationPatient" not in ds and "ImagePositionPatient" not in ds:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
        try:
            px = np.asarray([float(v) for v in spacing], dtype=float)
        except (TypeError, ValueError):
            px = np.ones(2)
        return np.array([[1.0, 0, 0], [0, 1.0, 0]]), np.zeros(3), px, True
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float).reshape(2, 3)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        spacing = np.asarray([float(v) for v in ds.PixelSpacing], dtype=float)
    except (AttributeError, ValueError, TypeError) as err:
        raise InputError(file, f"missing or invalid plane geometry (ImageOrientation/Position, PixelSpacing): "
                         f"{err}") from err
    if not np.all(np.isfinite(iop)) or np.linalg.norm(cross(iop[0], iop[1])) < 0.5:
        raise InputError(file, f"invalid ImageOrientationPatient {list(iop.ravel())}")
    if not np.all(np.isfinite(ipp)) or not np.all(spacing > 0):
        raise InputError(file, f"invalid ImagePositionPatient or PixelSpacing {list(ipp)}, {list(spacing)}")
    return iop, ipp, spacing, False


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = _num(ds.get("RescaleSlope"))
    intercept = _num(ds.get("RescaleIntercept"))
    return (slope if slope not in (0.0, None) else 1.0), intercept


def _thickness(ds: Dataset) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = _num(ds.get(key))
        if value > 0:
            return value
    return 0.0


def _stack_key(iop: np.ndarray, rows: int, cols: int, spacing, echo: float, image_type: str) -> str:
    ori = ",".join(f"{v:.3f}" for v in np.asarray(iop).ravel())
    px = ",".join(f"{v:.4f}" for v in spacing)
    return f"{ori}|{rows}x{cols}|{px}|echo{echo:g}|{image_type}"


def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.cross`` of two 3-vectors, same arithmetic, without its ~40 us of axis handling (once per file)."""
    return np.array([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])


def _num(value: Any) -> float:
    """Float of a DICOM value (first item of a multi-value), 0.0 when absent or unparsable."""
    if type(value) is float:  # the common case, without the checks below
        return value if math.isfinite(value) else 0.0
    if value is None or value == "":
        return 0.0
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else 0.0
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result if math.isfinite(result) else 0.0
