"""On-disk cache of decoded volumes and deterministic transform outputs, with their metadata.

An entry's key hashes what determines its content: the loader's qualified name, the caller's ``key_extra``
(e.g. a transform configuration, see `config_key`), and every input file's path, size and mtime (a folder
counts as all files under it). Changing any of these misses the cache instead of serving stale data
(MONAI PersistentDataset issue #999). An entry is one ``.vol`` file: a JSON header with the affine, the meta
(so names and geometry survive, MONAI #8599) and a checksum, then the raw array bytes; a
truncated or corrupt entry fails the check, is logged and rebuilt. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datasets.volume import Volume, atomic_path

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def file_stamp(path: Path) -> list[list[Any]]:
    """``[[path, size, mtime_ns], ...]`` of a file, or of every file under a folder (sorted)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def config_key(config: Any) -> str:
    """Stable text of a transform configuration (dicts, lists, dataclasses, numbers) for ``key_extra``."""
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        config = asdict(config)
    return json.dumps(config, sort_keys=True, default=repr)


def cache_key(path: Path | None, loader: Callable[..., Any], key_extra: str = "") -> str:
    """SHA-256 hex of the loader name, ``key_extra`` and the input files' stamps."""
    name = f"{getattr(loader, '__module__', '')}.{getattr(loader, '__qualname__', repr(loader))}"
    stamp = file_stamp(path) if path is not None else []
    payload = json.dumps([CACHE_FORMAT, name, key_extra, stamp])
    return hashlib.sha256(payload.encode()).hexdigest()


MAGIC = b"FEWSCAN-CACHE-1\n"


def checksum(array: np.ndarray) -> list[int]:
    """Wrapping 64-bit word sum of the array bytes (+ the odd tail): catches bit flips, zeroed pages and
    truncation at memory speed (a CRC-32 costs ~3x more on a 26 MB volume and would dominate a cache hit)."""
    raw = np.ascontiguousarray(array).view(np.uint8).ravel()
    words = raw[: raw.size // 8 * 8].view(np.uint64)
    tail = int.from_bytes(raw[raw.size // 8 * 8:].tobytes(), "little")
    return [int(words.sum(dtype=np.uint64)), tail, int(raw.size)]


def save_entry(volume: Volume, target: Path) -> None:
    """Write one entry atomically: magic, header length, JSON header (geometry, meta, checksum), raw array."""
    array = np.ascontiguousarray(volume.array)
    header = json.dumps({
        "dtype": array.dtype.str, "shape": list(array.shape), "affine": np.asarray(volume.affine).tolist(),
        "meta": volume.meta, "checksum": checksum(array),
    }, default=_json_default).encode()
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
        fh.write(memoryview(array).cast("B"))


def load_entry(target: Path) -> Volume | None:
    """Read one entry; None (with a warning) when it is truncated, malformed or fails its checksum."""
    try:
        with open(target, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a fewscan cache entry")
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
            count = int(np.prod(shape))
            array = np.fromfile(fh, dtype=dtype, count=count)
            extra = fh.read(1)
        if array.size != count or extra:
            raise ValueError(f"{array.size} of {count} values")
        array = array.reshape(shape)
        affine = np.asarray(header["affine"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("cache entry %s unreadable (%s): rebuilding", target.name, err)
        return None
    if checksum(array) != header.get("checksum") or affine.shape != (4, 4):
        log.warning("cache entry %s corrupt (checksum mismatch): rebuilding", target.name)
        return None
    return Volume(array, affine, header["meta"])


def cached_load(
    path: Path | None,
    loader: Callable[[Path], Volume],
    cache_dir: Path,
    key_extra: str = "",
) -> Volume:
    """``loader(path)``, served from ``cache_dir`` when an intact entry for the same inputs exists.

    Args:
        path: input file or folder (its files' path/size/mtime are part of the key); None for pure
            transform outputs keyed only by ``key_extra``.
        loader: deterministic function returning a Volume (a loader, or a closure applying transforms).
        cache_dir: cache folder (created if needed).
        key_extra: anything else the output depends on: loader options, transform configuration.

    Returns:
        The Volume (array, affine and meta as the loader returned them).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{cache_key(path, loader, key_extra)}.vol"
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
    """Delete every entry in ``cache_dir``; returns how many."""
    entries = list(Path(cache_dir).glob("*.vol")) if Path(cache_dir).is_dir() else []
    for e in entries:
        os.unlink(e)
    return len(entries)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
