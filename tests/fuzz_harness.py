"""Seeded byte-mutation fuzzing of the file readers (imported by tests/test_fuzz.py and benchmarks/fuzz_loaders.py;
not a test module).

Seeds are tiny valid files: a single-frame DICOM series, a legacy multi-frame DICOM file, an uncompressed and a
gzipped NIfTI and an MHA. Each case mutates one seed file (flipped or random bytes, a truncation, an inserted or
deleted chunk, or an 8-byte header field set to a huge value) and loads it through the public reader that a user's
command would reach (`load_series`, `load_volume`, `index`'s `summarise_file`). A reader may accept the mutant or
refuse it with `FewscanError`; anything else is a finding.
"""

from __future__ import annotations

import shutil
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_factory import ramp, write_series

from datasets.volume import FewscanError


def _multiframe(folder: Path) -> Path:
    """One legacy multi-frame file (NumberOfFrames 4, GridFrameOffsetVector)."""
    path = write_series(folder, ramp(6, 5, 1), prefix="mf")[0]
    import pydicom

    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 4
    ds.GridFrameOffsetVector = [0, 2, 4, 6]
    ds.PixelData = np.ascontiguousarray(np.moveaxis(ramp(6, 5, 4), 2, 0).astype(np.uint16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seeds(root: Path) -> dict[str, Path]:
    """Seed files under `root`: name -> path (a DICOM series is a folder; its first file is mutated)."""
    import SimpleITK as sitk

    seeds = {"dicom_series": root / "series", "dicom_multiframe": root / "mf"}
    write_series(seeds["dicom_series"], ramp(6, 5, 3))
    _multiframe(seeds["dicom_multiframe"])
    array = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    affine = np.diag([0.8, 0.7, 2.0, 1.0])
    for name in ("nifti.nii", "nifti.nii.gz"):
        nib.save(nib.Nifti1Image(array, affine), root / name)
        seeds[name] = root / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(root / "image.mha"))
    seeds["image.mha"] = root / "image.mha"
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation of `data` (never the identity for non-empty data)."""
    buf = bytearray(data)
    kind = int(rng.integers(6))
    n = len(buf)
    if kind == 0:  # flip bits
        for i in rng.integers(0, n, size=int(rng.integers(1, 9))):
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # random bytes
        for i in rng.integers(0, n, size=int(rng.integers(1, 9))):
            buf[i] = int(rng.integers(256))
    elif kind == 2:  # truncate
        buf = buf[:int(rng.integers(0, n))]
    elif kind == 3:  # insert a chunk
        i = int(rng.integers(0, n))
        buf[i:i] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:  # delete a chunk
        i = int(rng.integers(0, n))
        del buf[i:i + int(rng.integers(1, 64))]
    else:  # a header-sized field set to a huge or negative value: lengths, dims, frame counts
        i = int(rng.integers(0, min(n, 1024)))
        value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 10**9, 1 << 20])
        buf[i:i + 4] = int(value).to_bytes(4, "little")
    return bytes(buf)


def readers() -> dict[str, Callable[[Path], object]]:
    """Seed name -> the public reader a command reaches for it (its argument: the mutated file or folder)."""
    from datasets.dicom import load_series
    from datasets.index import summarise_file
    from datasets.volume_io import load_volume

    def series(folder: Path) -> object:
        for f in sorted(folder.iterdir()):  # index reads headers first, then the series is loaded
            summarise_file(f, None)
        return load_series(folder)

    return {"dicom_series": series, "dicom_multiframe": series, "nifti.nii": load_volume,
            "nifti.nii.gz": load_volume, "image.mha": load_volume}


@dataclass
class FuzzResult:
    """Outcome counts and the distinct findings (exception type and innermost project frame)."""

    counts: Counter = field(default_factory=Counter)
    findings: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def _where(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/datasets/" in f.filename]
    place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(err).__name__} at {place}"


def fuzz(work: Path, n_per_seed: int, seed: int = 0) -> FuzzResult:
    """Run `n_per_seed` mutants of every seed through its reader under `work`."""
    import warnings

    seeds = write_seeds(work / "seeds")
    result = FuzzResult()
    rng = np.random.default_rng(seed)
    read = readers()
    for name, source in seeds.items():
        for _ in range(n_per_seed):
            case = work / "case"
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            if source.is_dir():
                target = case / source.name
                shutil.copytree(source, target)
                victim = sorted(target.iterdir())[0]
            else:
                target = victim = case / source.name
            victim.write_bytes(mutate(source.read_bytes() if source.is_file() else
                                      (source / victim.name).read_bytes(), rng))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    read[name](target)
                result.counts["accepted"] += 1
            except FewscanError:
                result.counts["input error"] += 1
            except Exception as err:  # noqa: BLE001 - every other exception is what fuzzing looks for
                result.counts["other"] += 1
                key = f"{name}: {_where(err)}"
                result.findings[key] += 1
                result.examples.setdefault(key, f"{type(err).__name__}: {str(err)[:200]}")
    return result


# --- memory bombs: tiny files whose headers promise huge arrays ------------------------------------------------
def _nifti_header(shape: tuple[int, ...], dtype: type) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    return header.binaryblock + b"\0\0\0\0"  # the 4-byte extension flag: data would start at 352


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_bombs(root: Path) -> dict[str, Path]:
    """Small files that declare arrays of GiBs (the size guards must refuse each before allocating)."""
    import gzip
    import zipfile

    import pydicom

    root.mkdir(parents=True, exist_ok=True)
    bombs: dict[str, Path] = {}
    with gzip.open(root / "header_only.nii.gz", "wb") as f:  # ~70 bytes claiming 1024^3 float32
        f.write(_nifti_header((1024, 1024, 1024), np.float32))
    bombs["nifti.gz claiming 1024^3 float32, no data"] = root / "header_only.nii.gz"
    (root / "truncated.nii").write_bytes(_nifti_header((1024, 1024, 1024), np.float32) + b"\0" * 1024)
    bombs["nifti claiming 1024^3 float32, 1 KB of data"] = root / "truncated.nii"
    with gzip.open(root / "zeros.nii.gz", "wb", compresslevel=9) as f:  # 32 MB of zeros behind a 4 GiB header
        f.write(_nifti_header((2048, 2048, 1024), np.uint8))
        chunk = bytes(1 << 20)
        for _ in range(32):
            f.write(chunk)
    bombs["gzip bomb nifti (4 GiB declared)"] = root / "zeros.nii.gz"
    (root / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 1000\n"
                                   "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    bombs["MetaImage claiming 10^13 floats"] = root / "huge.mha"
    for name, frames in (("frames_1e9", 10**9), ("frames_50k", 50_000)):
        path = write_series(root / name, ramp(64, 64, 1))[0]
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = frames
        ds.save_as(path, enforce_file_format=True)
        bombs[f"DICOM, 8 KB file, NumberOfFrames {frames}"] = root / name
    with zipfile.ZipFile(root / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:  # 32 MB of zeros, 4 GiB declared
        with z.open("images.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((1 << 32,), "|u1"))
            chunk = bytes(1 << 20)
            for _ in range(32):
                f.write(chunk)
        z.writestr("labels.npy", _npy_header((4,), "<i8") + bytes(32))
    bombs["npz bomb (4 GiB declared)"] = root / "bomb.npz"
    with zipfile.ZipFile(root / "objects.npz", "w") as z:
        z.writestr("images.npy", _npy_header((2,), "|O") + b"\x80\x04N.")
        z.writestr("labels.npy", _npy_header((2,), "<i8") + bytes(16))
    bombs["npz with an object array"] = root / "objects.npz"
    return bombs


def read_bomb(path: Path) -> object:
    """The reader a command would use for a bomb file (npz: the classification source; else `load_volume`)."""
    from datasets.sources import load_npz
    from datasets.volume_io import load_volume

    return load_npz(path) if path.suffix == ".npz" else load_volume(path)
