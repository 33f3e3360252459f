"""DICOM SEG output: a DICOM series in, a Segmentation out that references it, holds the
NIfTI prediction's masks voxel for voxel, names its segments as dataset.json does, and that
dicom3tools' validator passes."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import run_medpipe

from medpipe.errors import MedpipeError
from medpipe.inference.dicom_seg import read_series, slice_indices
from medpipe.io import Geometry, Volume, read_image, write_dicom_series

SCAN = "brain_000_0000.nii.gz"


@pytest.fixture(scope="module")
def mr_series(tiny_pipeline, tmp_path_factory):
    """A tiny-pipeline brain written as an MR DICOM series (int16, one file per slice)."""
    scan = read_image(tiny_pipeline / "raw" / "imagesTr" / SCAN)
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_dicom_series(Volume(np.round(scan.array).astype(np.int16), scan.geometry), folder,
                       modality="MR")
    return folder


def dciodvfy_errors(path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("MEDPIPE_REQUIRE_DCIODVFY"):
            pytest.fail("no dciodvfy to validate the DICOM SEG (apt-get install dicom3tools)")
        pytest.skip("no dciodvfy (apt-get install dicom3tools)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def test_a_dicom_series_is_segmented_into_a_valid_dicom_seg(segmentation_run, mr_series,
                                                             tmp_path):
    import highdicom as hd

    seg_file, nifti = tmp_path / "seg.dcm", tmp_path / "labels.nii.gz"
    for target in (seg_file, nifti):  # a .dcm name for a DICOM series in: a SEG by default
        done = run_medpipe("predict", "--model", str(segmentation_run), "-i", str(mr_series),
                       "-o", str(target), "--device", "cpu")
        assert done.returncode == 0, done.stderr
    labels = read_image(nifti)
    assert dciodvfy_errors(seg_file) == []

    seg = hd.seg.segread(seg_file)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["CSF", "grey_matter",
                                                             "white_matter"]
    sources = sorted(read_series(mr_series), key=lambda d: int(d.InstanceNumber))
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
        assert_missing_frames_are_empty=True)  # (frames, rows, columns, segments)
    # write_dicom_series puts slice k of this right-handed grid in instance k + 1
    for number, value in enumerate((1, 2, 3)):
        expected = (labels.array == value).transpose(2, 1, 0)
        assert expected.any()
        assert np.array_equal(masks[..., number].astype(bool), expected), value


def test_dicom_seg_mistakes_are_refused_before_any_work(segmentation_run, mr_series,
                                                        tiny_pipeline, tmp_path):
    nifti_scan = tiny_pipeline / "raw" / "imagesTr" / SCAN
    cases = [
        (["-i", str(nifti_scan), "-o", str(tmp_path / "a.dcm"), "--format", "dicom-seg"],
         "input must be a DICOM series folder"),
        (["-i", str(mr_series), "-o", str(tmp_path / "a.nii.gz"), "--format", "dicom-seg"],
         "ending in .dcm"),
        (["-i", str(mr_series), "-o", str(tmp_path / "a.dcm"), "--probabilities"],
         "not written beside a DICOM SEG"),
    ]
    for args, message in cases:
        done = run_medpipe("predict", "--model", str(segmentation_run), *args)
        assert done.returncode != 0 and message in " ".join(done.stderr.split()), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.iterdir())


def test_a_label_map_off_the_series_grid_is_refused(mr_series):
    sources = read_series(mr_series)
    labels = read_image(mr_series)
    assert sorted(slice_indices(labels, sources, mr_series)) == list(range(labels.shape[2]))
    moved = Geometry(labels.geometry.spacing,
                     tuple(o + 1.0 for o in labels.geometry.origin), labels.geometry.direction)
    with pytest.raises(MedpipeError, match="does not lie on this series' grid"):
        slice_indices(Volume(labels.array, moved), sources, mr_series)
