"""Guards at the file boundary: malformed headers become input errors, and sizes are checked before allocating.

pydicom parses data elements lazily, so a corrupt value surfaces wherever it is first read (`ds.Rows`,
`ds.get(...)`), as whatever its converter raises (`NotImplementedError` for an unknown VR, `ValueError`,
`struct.error`, ...); nibabel and numpy do the same for NIfTI and npz headers. `malformed(path)` wraps the code
that reads one file and turns those into one `InputError` naming the file, so no command shows a traceback for a
damaged file. Sizes: a header can claim any shape (a 71-byte NIfTI claiming 1024^3 float32, a 10 KB DICOM with
NumberOfFrames 10^9, a zip of zeros): `check_size` refuses what would not fit before anything is allocated.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator, Sequence

import numpy as np

from datasets.volume import InputError

# What a damaged header raises from pydicom / nibabel / numpy converters (never our own InputError, re-raised).
MALFORMED: tuple[type[BaseException], ...] = (
    NotImplementedError, ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
    ZeroDivisionError, struct.error, EOFError, np.linalg.LinAlgError, MemoryError,
)
MAX_FRAMES = 100_000  # frames of one DICOM object: cine and 4D series stay far below
LIMIT_ENV = "FEWSCAN_MAX_GB"


def _malformed_types() -> tuple[type[BaseException], ...]:
    from nibabel.orientations import OrientationError
    from pydicom.errors import BytesLengthException

    return (*MALFORMED, BytesLengthException, OrientationError)


@contextlib.contextmanager
def malformed(path: str | os.PathLike[str], what: str = "file") -> Iterator[None]:
    """Re-raise a parser's exception from the block as `InputError(path, "malformed WHAT: reason")`."""
    try:
        yield
    except InputError:
        raise
    except _malformed_types() as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(path, f"malformed {what} ({type(err).__name__}{': ' + reason if reason else ''})") from err


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo; 8 GiB where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def byte_limit() -> int:
    """Largest array one file may decode to: `FEWSCAN_MAX_GB` (GiB), else half of the available memory."""
    value = os.environ.get(LIMIT_ENV)
    if value:
        try:
            return int(float(value) * (1 << 30))
        except ValueError:
            raise InputError(LIMIT_ENV, f"environment variable is not a number of GiB: {value!r}") from None
    return _available_bytes() // 2


def check_size(path: str | os.PathLike[str], shape: Sequence[int], itemsize: int, what: str = "image") -> None:
    """Refuse a header whose `shape` of `itemsize`-byte values exceeds `byte_limit()`, or has a negative side.

    Raises:
        InputError: naming the file, the declared shape and size, and how to raise the limit.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InputError(path, f"its header declares a negative {what} size {dims}")
    need, limit = math.prod(dims) * int(itemsize), byte_limit()
    if need > limit:
        raise InputError(path, f"its header declares a {'x'.join(map(str, dims))} {what} of {need / (1 << 30):.1f} "
                         f"GiB decoded, above the limit of {limit / (1 << 30):.1f} GiB (half the available "
                         f"memory; set {LIMIT_ENV} to change it)")


MAX_RATIO = 200  # decoded : stored bytes above which a large file is a truncated header or a decompression bomb
RATIO_FLOOR = 1 << 30  # files declaring less than this are not ratio-checked (label maps compress ~100:1)


def check_stored(path: str | os.PathLike[str], declared: int, stored: int, compressed: bool, what: str) -> None:
    """Refuse a file whose header declares more data than its bytes on disk can hold.

    Args:
        path: the file (named in the error).
        declared: bytes of data the header declares (stored type, before any scaling).
        stored: bytes the data occupies on disk (file size less the header, or a zip member's compressed size).
        compressed: whether the data is deflated: then only a ratio above `MAX_RATIO` on a large file is refused.
        what: what the data is, for the message.

    Raises:
        InputError: a truncated file (uncompressed), or a ratio that only a bomb or a cut stream gives.
    """
    if not compressed and declared > stored:
        raise InputError(path, f"its header declares {declared} bytes of {what} but the file holds {stored} "
                         "(truncated?)")
    if compressed and declared > RATIO_FLOOR and declared > MAX_RATIO * max(stored, 1):
        raise InputError(path, f"declares {declared / (1 << 30):.1f} GiB of {what} in {stored} compressed bytes "
                         f"(more than {MAX_RATIO}:1): a truncated file or a decompression bomb")
