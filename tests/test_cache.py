"""Volume cache: hits skip the loader, keys follow inputs and configuration, corrupt entries are rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from dicom_factory import ramp, write_series

from datasets.cache import cached_load, config_key
from datasets.dicom import load_series
from datasets.volume import Volume


def counting(calls: list[Path]):  # noqa: ANN201 - a loader
    def loader(path: Path) -> Volume:
        calls.append(path)
        return load_series(path)

    return loader


def test_hit_keeps_array_affine_and_meta(tmp_path: Path) -> None:
    write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    first = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    second = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 1
    np.testing.assert_array_equal(first.array, second.array)
    np.testing.assert_array_equal(first.affine, second.affine)
    assert second.meta == first.meta and second.meta["source_orientation"] == "LPS"


def test_changed_file_or_configuration_misses(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    cached_load(tmp_path / "s", loader, tmp_path / "cache", key_extra=config_key({"spacing": [1, 1, 1]}))
    cached_load(tmp_path / "s", loader, tmp_path / "cache", key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 2
    os.utime(files[0], ns=(1, 1))
    cached_load(tmp_path / "s", loader, tmp_path / "cache", key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 3


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path: Path) -> None:
    write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    good = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.vol")
    data = bytearray(entry.read_bytes())
    start = data.index(np.ascontiguousarray(good.array).tobytes()[:64])  # flip a byte inside the array
    data[start + 10] ^= 0xFF
    entry.write_bytes(bytes(data))
    again = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 2
    np.testing.assert_array_equal(again.array, good.array)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 3
