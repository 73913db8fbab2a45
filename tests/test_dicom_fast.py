"""The loader's fast header path gives exactly what pydicom gives, and hands every other file back to pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ramp, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

from datasets.dicom import decode, load_series, read_dataset
from datasets.dicom_fast import KEYWORDS, REFUSE, read_header
from datasets.dicom_frames import frames_of, is_image
from datasets.volume import InputError


def assert_same(path: Path) -> None:
    """Header values, planes and pixels of the fast path equal pydicom's for one file."""
    ds, header = read_dataset(path), read_header(path)
    assert ds is not None and header is not None, path
    for keyword in KEYWORDS - {"PixelData", *REFUSE.values()}:
        assert (keyword in ds) == (keyword in header), (path, keyword)
        a, b = ds.get(keyword), header.get(keyword)
        assert a == b or str(a) == str(b), (path, keyword, a, b)
    assert is_image(ds) == is_image(header)
    if not is_image(ds):
        return

    def outcome(fn, source):  # noqa: ANN001, ANN202 - the value, or the user-facing error
        try:
            return fn(source)
        except InputError as err:
            return str(err)

    planes = outcome(lambda d: [f.to_json() for f in frames_of(d, path)], ds)
    assert planes == outcome(lambda d: [f.to_json() for f in frames_of(d, path)], header)
    want, got = outcome(lambda d: decode(d, str(path)), ds), outcome(lambda d: decode(d, str(path)), header)
    if isinstance(want, str):
        assert want == got
    else:
        assert want.dtype == got.dtype and want.shape == got.shape
        np.testing.assert_array_equal(want, got)


def _rewrite(path: Path, change) -> Path:  # noqa: ANN001 - change(ds) edits the dataset in place
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_plain_series_is_identical_and_loads_the_same(tmp_path: Path, monkeypatch) -> None:
    files = write_series(tmp_path / "s", ramp(6, 5, 4), slope=2.0, intercept=-1024.0,
                         extra={"AcquisitionNumber": None, "SeriesDescription": "", "ImageType": ["ORIGINAL", "AX"]})
    for f in files:
        assert_same(f)
    fast = load_series(tmp_path / "s")
    monkeypatch.setattr("datasets.dicom.read_header", lambda path: None)  # pydicom for every file
    slow = load_series(tmp_path / "s")
    np.testing.assert_array_equal(fast.array, slow.array)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    assert fast.meta == slow.meta


@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_are_cleared_or_sign_extended_as_pydicom_does(tmp_path: Path, signed: int) -> None:
    (path,) = write_series(tmp_path, ramp(6, 5, 1))
    junk = np.random.default_rng(0).integers(0, 65536, size=(6, 5), dtype=np.uint16)  # high bits set at random

    def change(ds: Dataset) -> None:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
        ds.PixelData = junk.tobytes()

    assert_same(_rewrite(path, change))
    assert read_header(path).pixels().min() < 0 if signed else read_header(path).pixels().max() < 4096


def test_implicit_vr_and_undefined_length_sequences_are_walked(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ramp(6, 5, 2))

    def change(ds: Dataset) -> None:
        inner = Dataset()
        inner.CodeValue, inner.CodeMeaning = "123", "x" * 11
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3"
        item.PurposeOfReferenceCodeSequence = DicomSequence([inner])
        ds.ReferencedImageSequence = DicomSequence([item, item])
        ds.ReferencedImageSequence.is_undefined_length = True
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
        ds.RescaleSlope, ds.TriggerTime = "1.5", "12.25"

    explicit = _rewrite(paths[0], change)
    implicit = _rewrite(paths[1], lambda ds: (change(ds), setattr(ds.file_meta, "TransferSyntaxUID",
                                                                   ImplicitVRLittleEndian)))
    for path in (explicit, implicit):
        assert read_header(path) is not None
        assert_same(path)


def test_anything_unusual_goes_to_pydicom(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ramp(6, 5, 6))
    big = paths[0]  # only the declared syntax matters here
    big.write_bytes(big.read_bytes().replace(b"1.2.840.10008.1.2.1\0", ExplicitVRBigEndian.encode() + b"\0", 1))
    rle = _rewrite(paths[1], lambda ds: ds.compress(RLELossless))
    mosaic = _rewrite(paths[2], lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]))
    latin = _rewrite(paths[3], lambda ds: setattr(ds, "SeriesDescription", "Thorax sp\u00e4t"))
    bad = _rewrite(paths[4], lambda ds: setattr(ds, "InstanceNumber", "1.0"))  # pydicom accepts it, we do not
    (tmp_path / "notes.dat").write_bytes(b"not dicom at all" * 20)
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(paths[5].read_bytes()[:-7])  # inside the pixel data
    for path in (big, rle, mosaic, latin, bad, tmp_path / "notes.dat", truncated):
        assert read_header(path) is None, path
    assert read_header(paths[5]) is not None
    data = paths[5].read_bytes()
    for cut in range(200, len(data), 37):  # cut anywhere: the fast path fails over or agrees with pydicom
        truncated.write_bytes(data[:cut])
        if read_header(truncated) is not None and read_dataset(truncated) is not None:
            assert_same(truncated)


@pytest.mark.realdata
def test_every_plain_file_of_the_shared_data_reads_as_with_pydicom(shared_data: Path) -> None:
    checked = 0
    for path in sorted(p for p in shared_data.rglob("*") if p.is_file() and p.suffix not in (".gz", ".png")):
        if read_header(path) is not None:
            assert_same(path)
            checked += 1
    assert checked >= 40  # CT/MR/RTDOSE series, implicit VR, 12-bit stored, sequences, RTSTRUCT, RTPLAN
