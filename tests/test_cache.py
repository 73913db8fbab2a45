"""Volume cache: hits skip the loader, keys follow inputs and configuration, corrupt entries are rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from dicom_factory import ramp, write_series

from datasets.cache import cached_load, config_key, load_entry, save_entry
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


def test_changed_content_or_configuration_misses_touch_and_move_hit(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    cache = tmp_path / "cache"
    cached_load(tmp_path / "s", loader, cache, key_extra=config_key({"spacing": [1, 1, 1]}))
    cached_load(tmp_path / "s", loader, cache, key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 2
    os.utime(files[0], ns=(1, 1))  # same bytes, new mtime: keyed by content, still a hit
    cached_load(tmp_path / "s", loader, cache, key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 2
    (tmp_path / "s").rename(tmp_path / "moved")  # same names and bytes elsewhere: a hit
    cached_load(tmp_path / "moved", loader, cache, key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 2
    moved = tmp_path / "moved" / files[0].name
    data = bytearray(moved.read_bytes())
    data[-1] ^= 0x01  # one pixel bit: a miss, and the new value is served
    moved.write_bytes(bytes(data))
    os.utime(moved, ns=(1, 1))  # even with the old mtime
    changed = cached_load(tmp_path / "moved", loader, cache, key_extra=config_key({"spacing": [2, 2, 2]}))
    assert len(calls) == 3
    np.testing.assert_array_equal(changed.array, load_series(tmp_path / "moved").array)


def test_stat_reference_is_reused_once_inputs_are_old_enough(tmp_path: Path, monkeypatch) -> None:
    import datasets.cache as cache_module

    write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    cached_load(tmp_path / "s", counting(calls), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.ref"))  # inputs just written: no stat shortcut yet (racy)
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    cached_load(tmp_path / "s", counting(calls), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.ref"))) == 1 and len(calls) == 1
    hashed: list[int] = []
    monkeypatch.setattr(cache_module, "content_stamp", lambda *a: hashed.append(1) or [])
    hit = cached_load(tmp_path / "s", counting(calls), tmp_path / "cache")
    assert not hashed and len(calls) == 1  # served through the .ref without reading the inputs
    assert hit.array.flags.writeable
    hit.array[0, 0, 0] += 1  # copy-on-write: the entry file is not changed
    again = cached_load(tmp_path / "s", counting(calls), tmp_path / "cache")
    assert again.array[0, 0, 0] == hit.array[0, 0, 0] - 1


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path: Path) -> None:
    write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    good = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.vol")
    data = bytearray(entry.read_bytes())
    data[-(good.array.nbytes // 2)] ^= 0xFF  # flip a byte inside the array (the entry ends with it)
    entry.write_bytes(bytes(data))
    again = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 2
    np.testing.assert_array_equal(again.array, good.array)
    cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 2
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 3


def test_checksum_is_verified_once_per_unchanged_entry(tmp_path: Path, monkeypatch) -> None:
    import datasets.cache as cache_module

    write_series(tmp_path / "s", ramp(6, 5, 3))
    calls: list[Path] = []
    loader = counting(calls)
    good = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.vol")
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    cache_module.forget_verified()
    sums: list[int] = []
    real = cache_module.checksum
    monkeypatch.setattr(cache_module, "checksum", lambda a: sums.append(1) or real(a))
    for _ in range(3):
        cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(sums) == 1 and len(calls) == 1
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF  # corrupt in place (same size): the changed mtime makes the next read verify again
    entry.write_bytes(bytes(data))
    os.utime(entry, ns=(1, 1))  # a distinct mtime even within one coarse file-system clock tick
    again = cached_load(tmp_path / "s", loader, tmp_path / "cache")
    assert len(calls) == 2
    np.testing.assert_array_equal(again.array, good.array)


def test_entries_keep_any_layout_and_views_keep_their_strides(tmp_path: Path) -> None:
    base = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    views = [base, base.T, base[::-1, :, ::-1], base.transpose(2, 0, 1)[:, ::-1], base[:, ::2],
             np.asfortranarray(base)[::-1], base[:, :1], np.zeros((0, 3), np.int16), np.float64(2.5) * base[0]]
    for i, array in enumerate(views):
        save_entry(Volume(array, np.eye(4), {"i": i}), tmp_path / f"{i}.vol")
        back = load_entry(tmp_path / f"{i}.vol")
        assert back is not None and back.meta == {"i": i}
        np.testing.assert_array_equal(back.array, array)
        assert back.array.dtype == array.dtype
        if array.size and (array.flags.c_contiguous or array.flags.f_contiguous or i == 2 or i == 3):
            assert back.array.strides == array.strides, i  # dense views come back with the same layout
