"""Label objects on their image grid: RTSTRUCT (synthetic and rt-utils), DICOM-SEG (dcmqi, highdicom), label maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import ramp, square, write_rtstruct, write_series

from datasets.dicom import load_series
from datasets.labels import align_label_map, load_labels
from datasets.volume import InputError, Volume
from datasets.volume_io import load_volume


def test_rtstruct_square_with_hole_lands_on_the_right_voxels(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", ramp(10, 10, 3), origin=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0))
    # ROI 1: pixel centres 2..7 (cols) x 1..6 (rows) on slice 1 (z = 2 mm), minus an inner 4..5 x 3..4 hole
    outer, inner = square(1.5, 0.5, 7.5, 6.5, 2.0), square(3.5, 2.5, 5.5, 4.5, 2.0)
    write_rtstruct(tmp_path / "rt.dcm", files, [(1, 1, outer), (1, 1, inner), (2, 2, square(0.5, 0.5, 2.5, 2.5, 4))])
    image = load_series(tmp_path / "ct")
    labels = load_labels(tmp_path / "rt.dcm", tmp_path / "ct")
    assert labels.array.shape == image.array.shape and np.allclose(labels.affine, image.affine)
    assert labels.meta["label_names"] == {"1": "organ1", "2": "organ2"}
    expected = np.zeros((10, 10, 3), np.uint16)  # stored (col, row, slice) order, then flipped like the image
    expected[2:8, 1:7, 1] = 1
    expected[4:6, 3:5, 1] = 0
    expected[1:3, 1:3, 2] = 2
    np.testing.assert_array_equal(labels.array, expected[::-1, ::-1, :])


def test_rtstruct_for_another_series_or_off_slice_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", ramp(6, 6, 2), origin=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0))
    write_rtstruct(tmp_path / "other.dcm", files, [(1, 0, square(1, 1, 3, 3, 0))], series_uid="1.2.3.999")
    with pytest.raises(InputError, match=r"other\.dcm: references series 1\.2\.3\.999"):
        load_labels(tmp_path / "other.dcm", tmp_path / "ct")
    write_rtstruct(tmp_path / "off.dcm", files, [(1, 0, square(1, 1, 3, 3, 0.9))])
    with pytest.raises(InputError, match=r"off\.dcm: ROI 1 contour lies 0\.90 mm from the nearest slice"):
        load_labels(tmp_path / "off.dcm", tmp_path / "ct")
    with pytest.raises(InputError, match="needs its image series"):
        load_labels(tmp_path / "off.dcm")


def test_label_map_alignment_exact_flip_refuse_and_resample(tmp_path: Path) -> None:
    image = Volume(np.zeros((4, 5, 6), np.float32), np.diag([1.0, 2.0, 3.0, 1.0]))
    label = np.arange(120, dtype=np.uint8).reshape(4, 5, 6)
    flipped_affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    flipped_affine[0, 3] = 3.0  # same grid, stored with the first axis reversed
    nib.save(nib.Nifti1Image(label[::-1].copy(), flipped_affine), tmp_path / "flip.nii.gz")
    aligned = load_labels(tmp_path / "flip.nii.gz", image=image)
    np.testing.assert_array_equal(aligned.array, label)
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 2.0, 2.5, 1.0])), tmp_path / "off.nii.gz")
    with pytest.raises(InputError, match=r"off\.nii\.gz: geometry differs from its image"):
        load_labels(tmp_path / "off.nii.gz", image=image)
    resampled = load_labels(tmp_path / "off.nii.gz", image=image, mismatch="resample")
    assert resampled.array.shape == image.array.shape and "resampled" in resampled.meta
    part = Volume(label[1:3, 1:4, 2:5], image.affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 2],
                                                                   [0, 0, 0, 1]], float))
    placed = align_label_map(part, image, where=tmp_path)
    np.testing.assert_array_equal(placed.array[1:3, 1:4, 2:5], label[1:3, 1:4, 2:5])
    assert placed.array.sum() == label[1:3, 1:4, 2:5].sum()


@pytest.mark.realdata
def test_dcmqi_seg_equals_the_nrrd_label_maps(shared_data: Path) -> None:
    root = shared_data / "dcmqi_seg" / "data" / "segmentations"
    image = load_series(root / "ct-3slice")
    liver = load_labels(root / "liver.dcm", root / "ct-3slice")
    assert liver.meta["label_names"] == {"1": "Liver"} and np.allclose(liver.affine, image.affine)
    nrrd = align_label_map(load_volume(root / "liver_seg.nrrd"), image, where=root)
    np.testing.assert_array_equal(liver.array > 0, nrrd.array > 0)
    assert liver.array.sum() > 10000
    masks = load_labels(root / "partial_overlaps.dcm", root / "ct-3slice", masks=True)
    assert masks.array.shape == (512, 512, 3, 5)
    for i in (1, 2, 3):  # each NRRD holds non-overlapping segments; voxel value = segment number
        label_map = align_label_map(load_volume(root / f"partial_overlaps-{i}.nrrd"), image, where=root)
        for value in np.unique(label_map.array)[1:]:
            np.testing.assert_array_equal(masks.array[..., value - 1] > 0, label_map.array == value)
    with pytest.raises(InputError, match="segments overlap"):
        load_labels(root / "partial_overlaps.dcm", root / "ct-3slice")


@pytest.mark.realdata
def test_highdicom_segs_match_highdicom_per_source_instance(shared_data: Path) -> None:
    import highdicom as hd

    root = shared_data / "pydicom_testdata"
    series = root / "ct2_series"  # 4 slices with 161 missing in between: only loadable resampled
    image = load_series(series, irregular="resample")
    files = sorted(series.iterdir())
    sops = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for name in ("seg_image_ct_binary.dcm", "seg_image_ct_binary_fractional.dcm", "seg_image_ct_true_fractional.dcm",
                 "seg_image_ct_binary_overlap.dcm"):
        masks = load_labels(root / "seg_highdicom" / name, series, masks=True, irregular="resample")
        assert masks.array.shape[:3] == image.array.shape and np.allclose(masks.affine, image.affine)
        seg = hd.seg.segread(root / "seg_highdicom" / name)
        expected = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in sops], skip_overlap_checks=True)
        if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
            expected = expected >= 0.5
        for d, planes in zip(sops, expected, strict=True):  # (rows, cols, segments) per source image
            ras = np.array([float(v) for v in d.ImagePositionPatient]) * [-1, -1, 1]
            k = int(round(np.linalg.solve(image.affine, np.r_[ras, 1.0])[2]))
            # canonical flips columns and rows of an axial LPS slice
            np.testing.assert_array_equal(masks.array[::-1, ::-1, k, :] > 0, planes.transpose(1, 0, 2) > 0)


@pytest.mark.realdata
def test_rtutils_phantom_masks_and_bad_references(shared_data: Path) -> None:
    root = shared_data / "rtutils_phantom" / "tests" / "mock_data"
    ct = [root / "ct_1.dcm", root / "ct_2.dcm"]
    labels = load_labels(root / "rt.dcm", ct)
    assert labels.array.shape == (512, 512, 2) and labels.meta["label_names"] == {"1": "ROI-1"}
    assert labels.array[..., 0].sum() > 100 and labels.array[..., 1].sum() == 0  # contour on z = 60 only
    for bad in ("invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"):
        with pytest.raises(InputError, match=rf"{bad}: contours reference 1 image\(s\) not in the reference series"):
            load_labels(root / bad, ct)
