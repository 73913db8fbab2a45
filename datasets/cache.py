"""On-disk cache of decoded volumes and deterministic transform outputs, with their metadata.

Keys. An entry is keyed by *content*: the loader's qualified name, the caller's ``key_extra`` (e.g. a transform
configuration, see `config_key`; MONAI PersistentDataset issue #999), and each input file's name relative to the
input folder (the file name for a single file), size and SHA-1 of its bytes. Touching, copying or moving an input
therefore still hits; changing a byte misses. Hashing every byte costs about a third of decoding an uncompressed
series, too much for every hit, so a small ``<stat key>.ref`` file remembers the content key for the inputs'
current stat facts (relative name, size, mtime_ns, ctime_ns, inode; ctime cannot be set by tools that restore
mtimes). A hit then costs one ``stat`` per input file; any stat change re-hashes the contents. As git does for its
index, no ``.ref`` is written while an input changed less than `RACY_NS` ago, since a same-size rewrite within one
file-system clock tick could leave every stat fact equal.

Entries. One ``<content key>.vol`` file: magic, header length, a JSON header (dtype, shape, affine, meta -- so names
and geometry survive, MONAI #8599 -- memory layout and a checksum), padding to 64 bytes, then the raw array in its
memory order (`memory_order`: a hit returns the same strides as the loader did, and a write needs no copy).
Writes are atomic (temporary file + rename), so an entry is never rewritten in place. Reads map the file
copy-on-write (no copy of the array; writing to the returned array never touches the file) and check the exact
size, which catches truncation.
The checksum (a 64-bit word sum, at memory speed) is verified on the first read of an entry file in a process; later
reads of the same unchanged file (same inode, size, mtime, ctime; and last changed over `RACY_NS` ago) skip it,
because it costs several times the rest of a hit. A truncated, malformed or corrupt entry is logged and rebuilt.
Do not edit entries in place: a mapped array would see the change (and a truncation would crash its reader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datasets.volume import Volume, atomic_path

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
MAGIC = b"FEWSCAN-CACHE-2\n"
ALIGN = 64  # array offset alignment inside an entry
RACY_NS = 2_000_000_000  # inputs changed this recently are re-hashed on the next call instead of trusted by stat
_verified: dict[str, tuple[int, int, int, int]] = {}  # entry path -> stat facts when its checksum last passed


def file_stamp(path: Path) -> list[list[Any]]:
    """``[[name, size, mtime_ns, ctime_ns, inode], ...]`` of a file, or of every file under a folder (sorted);
    names are relative to the folder (the file name for a single file)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]]
    if not path.is_dir():
        return []  # the loader names the problem
    out: list[list[Any]] = []
    folders = [str(path)]
    skip = len(folders[0].rstrip(os.sep)) + 1  # entry paths are "<folder>/<name>": strip "<path>/"
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    out.append([entry.path[skip:], st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    out.sort()
    return out


def content_stamp(path: Path, stamp: list[list[Any]]) -> list[list[Any]]:
    """``[[name, size, sha1 hex], ...]`` for the files of a `file_stamp`."""
    path = Path(path)
    folder = path.is_dir()
    out = []
    for name, *_ in stamp:
        with open(path / name if folder else path, "rb") as fh:
            digest = hashlib.file_digest(fh, lambda: hashlib.sha1(usedforsecurity=False)).hexdigest()
            out.append([name, os.fstat(fh.fileno()).st_size, digest])
    return out


def config_key(config: Any) -> str:
    """Stable text of a transform configuration (dicts, lists, dataclasses, numbers) for ``key_extra``."""
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        config = asdict(config)
    return json.dumps(config, sort_keys=True, default=repr)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts]).encode()).hexdigest()


def _loader_name(loader: Callable[..., Any]) -> str:
    return f"{getattr(loader, '__module__', '')}.{getattr(loader, '__qualname__', repr(loader))}"


def cache_key(path: Path | None, loader: Callable[..., Any], key_extra: str = "",
              cache_dir: Path | None = None) -> str:
    """SHA-256 hex of the loader name, ``key_extra`` and the input files' names, sizes and content hashes.

    With ``cache_dir``, the content key is looked up by the inputs' stat facts in a ``.ref`` file there (and
    recorded when absent), so that unchanged inputs are not re-read.
    """
    name = _loader_name(loader)
    if path is None:
        return _digest(name, key_extra, [])
    stamp = file_stamp(path)
    ref = Path(cache_dir) / f"{_digest('stat', name, key_extra, str(Path(path).resolve()), stamp)}.ref" \
        if cache_dir is not None else None
    if ref is not None:
        try:
            known = ref.read_text()
            if len(known) == 64:
                return known
        except OSError:
            pass
    key = _digest(name, key_extra, content_stamp(path, stamp))
    if ref is not None and max((s[3] for s in stamp), default=0) < time.time_ns() - RACY_NS:
        try:
            with atomic_path(ref) as tmp:
                tmp.write_text(key)
        except OSError as err:
            log.warning("could not write cache reference %s: %s", ref, err)
    return key


def checksum(array: np.ndarray) -> list[int]:
    """Wrapping 64-bit word sum of the array bytes (+ the odd tail): catches bit flips, zeroed pages and
    truncation at memory speed (a CRC-32 costs ~3x more on a 26 MB volume and would dominate a cache hit)."""
    raw = np.ascontiguousarray(array).view(np.uint8).ravel()
    words = raw[: raw.size // 8 * 8].view(np.uint64)
    tail = int.from_bytes(raw[raw.size // 8 * 8:].tobytes(), "little")
    return [int(words.sum(dtype=np.uint64)), tail, int(raw.size)]


def memory_order(array: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """``(stored, axes, flips)``: the array's bytes in memory order as a C-contiguous view (a copy only when the
    array does not cover its memory densely), and how `from_memory_order` gives back the same view.

    Why: loaders return views (the DICOM loader's volume is a flipped, transposed view of its slice buffer);
    writing them in C order would cost a transposing copy of the whole volume (~25 ms for 26 MB), and a hit
    would then hand out a differently laid out array than a miss.
    """
    flips = [i for i, stride in enumerate(array.strides) if stride < 0 and array.shape[i] > 1]
    view = np.flip(array, axis=flips) if flips else array
    axes = sorted(range(view.ndim), key=lambda i: -abs(view.strides[i]))
    view = view.transpose(axes)
    if not view.flags.c_contiguous:
        return np.ascontiguousarray(array), list(range(array.ndim)), []
    return view, axes, flips


def from_memory_order(stored: np.ndarray, axes: list[int], flips: list[int]) -> np.ndarray:
    """Inverse of `memory_order`: the view with the original shape and strides."""
    array = stored.transpose(np.argsort(axes)) if axes else stored
    return np.flip(array, axis=flips) if flips else array


def save_entry(volume: Volume, target: Path) -> None:
    """Write one entry atomically: magic, header length, JSON header (geometry, meta, layout, checksum), padding,
    then the array's bytes in memory order."""
    stored, axes, flips = memory_order(np.asarray(volume.array))
    header = json.dumps({
        "dtype": stored.dtype.str, "shape": list(stored.shape), "axes": axes, "flips": flips,
        "affine": np.asarray(volume.affine).tolist(), "meta": volume.meta, "checksum": checksum(stored),
    }, default=_json_default).encode()
    header += b" " * (-(len(MAGIC) + 8 + len(header)) % ALIGN)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
        if stored.size:
            fh.write(memoryview(stored).cast("B"))


def load_entry(target: Path) -> Volume | None:
    """Read one entry (array mapped copy-on-write); None (with a warning) when truncated, malformed or corrupt."""
    try:
        with open(target, "rb") as fh:
            st = os.fstat(fh.fileno())
            facts = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if fh.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a fewscan cache entry")
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= st.st_size:
                raise ValueError("bad header length")
            header = json.loads(fh.read(size))
            dtype, shape = np.dtype(header["dtype"]), tuple(int(n) for n in header["shape"])
            offset = len(MAGIC) + 8 + size
            count = int(np.prod(shape))
            if st.st_size != offset + count * dtype.itemsize:
                raise ValueError(f"{st.st_size - offset} bytes of data for {count * dtype.itemsize}")
            if count == 0:
                stored = np.empty(shape, dtype)
            else:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                stored = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
        array = from_memory_order(stored, [int(a) for a in header["axes"]], [int(f) for f in header["flips"]])
        affine = np.asarray(header["affine"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("cache entry %s unreadable (%s): rebuilding", target.name, err)
        return None
    if affine.shape != (4, 4):
        log.warning("cache entry %s corrupt (affine): rebuilding", target.name)
        return None
    if _verified.get(str(target)) != facts:
        if checksum(stored) != header.get("checksum"):
            log.warning("cache entry %s corrupt (checksum mismatch): rebuilding", target.name)
            return None
        if max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - RACY_NS:  # else a rewrite could keep all facts
            _verified[str(target)] = facts
    return Volume(array, affine, header["meta"])


def forget_verified() -> None:
    """Make the next read of every entry verify its checksum again (as in a fresh process)."""
    _verified.clear()


def cached_load(
    path: Path | None,
    loader: Callable[[Path], Volume],
    cache_dir: Path,
    key_extra: str = "",
) -> Volume:
    """``loader(path)``, served from ``cache_dir`` when an intact entry for the same inputs exists.

    Args:
        path: input file or folder (its files' names, sizes and contents are part of the key); None for pure
            transform outputs keyed only by ``key_extra``.
        loader: deterministic function returning a Volume (a loader, or a closure applying transforms).
        cache_dir: cache folder (created if needed).
        key_extra: anything else the output depends on: loader options, transform configuration.

    Returns:
        The Volume (array, affine and meta as the loader returned them); a hit's array is a copy-on-write map
        of the entry file.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{cache_key(path, loader, key_extra, cache_dir)}.vol"
    if target.is_file():
        volume = load_entry(target)
        if volume is not None:
            return volume
    volume = loader(path) if path is not None else loader()  # type: ignore[call-arg]
    try:
        save_entry(volume, target)
    except OSError as err:  # a full or read-only disk must not fail the run: the data is still good
        log.warning("could not write cache entry %s: %s", target, err)
    return volume


def clear(cache_dir: Path) -> int:
    """Delete every entry (and stat reference) in ``cache_dir``; returns how many entries."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return 0
    entries = list(folder.glob("*.vol"))
    for e in [*entries, *folder.glob("*.ref")]:
        os.unlink(e)
    return len(entries)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
