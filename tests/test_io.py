"""Volume I/O: exact round trips, and geometry checked against nibabel and SimpleITK."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import oblique_geometry, random_volume

from medpipe.errors import GeometryError, ImageReadError, ImageWriteError
from medpipe.io import (
    Geometry,
    Volume,
    from_sitk,
    read_image,
    to_nibabel,
    to_sitk,
    write_image,
)

ITK_FORMATS = [".nrrd", ".mha", ".mhd"]
NIFTI_FORMATS = [".nii.gz", ".nii"]
FLOAT32_ATOL = 1e-4  # NIfTI stores the affine in float32: ~1e-5 mm at 100 mm


@pytest.mark.parametrize("suffix", NIFTI_FORMATS + ITK_FORMATS)
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_round_trip_keeps_voxels_exactly_and_geometry(tmp_path, suffix, flipped, dtype):
    volume = random_volume(dtype=dtype, geometry=oblique_geometry(3, flipped=flipped))
    path = write_image(volume, tmp_path / f"image{suffix}")
    back = read_image(path)

    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    atol = FLOAT32_ATOL if suffix in NIFTI_FORMATS else 1e-12
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(
            getattr(back.geometry, field), getattr(volume.geometry, field), rtol=0, atol=atol
        )


@pytest.mark.parametrize("flipped", [False, True])
def test_nifti_geometry_matches_nibabels_own_affine(tmp_path, flipped):
    volume = random_volume(geometry=oblique_geometry(5, flipped=flipped))
    path = write_image(volume, tmp_path / "image.nii.gz")

    reference = nib.load(path).affine  # nibabel's reading of the file, RAS+
    np.testing.assert_allclose(read_image(path).affine, reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(volume.affine, reference, rtol=0, atol=FLOAT32_ATOL)
    assert (np.linalg.det(reference[:3, :3]) < 0) == flipped


@pytest.mark.parametrize("suffix", NIFTI_FORMATS + ITK_FORMATS)
def test_lps_and_ras_name_the_same_physical_point(tmp_path, suffix):
    """A voxel's RAS position (our affine) is SimpleITK's LPS position with x, y negated."""
    volume = random_volume(geometry=oblique_geometry(11, flipped=True))
    path = write_image(volume, tmp_path / f"image{suffix}")
    itk_image = sitk.ReadImage(str(path))
    ours = read_image(path)

    for index in [(0, 0, 0), (8, 0, 0), (3, 7, 6), (8, 7, 6)]:
        lps = np.asarray(itk_image.TransformIndexToPhysicalPoint(index))
        ras = ours.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-5)
        # and the voxel value at that index is the same in both readers
        assert ours.array[index] == itk_image[index]


def test_reads_nifti_written_by_simpleitk(tmp_path):
    """An independent writer: ITK's own NIfTI must come back with ITK's geometry."""
    geometry = oblique_geometry(2, flipped=True)
    array = np.arange(9 * 8 * 7, dtype=np.int16).reshape(9, 8, 7)
    itk_image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    itk_image.SetSpacing(geometry.spacing)
    itk_image.SetOrigin(geometry.origin)
    itk_image.SetDirection(geometry.direction)
    sitk.WriteImage(itk_image, str(tmp_path / "itk.nii.gz"))

    ours = read_image(tmp_path / "itk.nii.gz")
    np.testing.assert_array_equal(ours.array, array)
    np.testing.assert_allclose(ours.geometry.origin, geometry.origin, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(ours.geometry.direction, geometry.direction, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(ours.geometry.spacing, geometry.spacing, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_vector_images_keep_components_last(tmp_path, suffix):
    geometry = oblique_geometry(4)
    field = np.random.default_rng(0).normal(size=(6, 5, 4, 3)).astype(np.float32)
    back = read_image(write_image(Volume(field, geometry), tmp_path / f"field{suffix}"))
    assert back.array.shape == (6, 5, 4, 3)
    np.testing.assert_array_equal(back.array, field)
    itk = sitk.ReadImage(str(tmp_path / f"field{suffix}"))
    assert itk.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(np.asarray(itk[5, 1, 2]), field[5, 1, 2])


def test_dicom_series_round_trip_oblique_right_handed(tmp_path):
    volume = random_volume(dtype=np.int16, geometry=oblique_geometry(6, flipped=False))
    folder = write_image(volume, tmp_path / "series")
    assert len(list(folder.glob("*.dcm"))) == volume.shape[2]
    back = read_image(folder)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.geometry.direction, volume.geometry.direction, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, volume.geometry.origin, atol=1e-5)
    np.testing.assert_allclose(back.geometry.spacing, volume.geometry.spacing, atol=1e-5)


def test_dicom_series_left_handed_keeps_every_voxel_in_place(tmp_path):
    """DICOM frames are right-handed; a flipped grid is stored reversed along k."""
    volume = random_volume(dtype=np.int16, geometry=oblique_geometry(6, flipped=True))
    back = read_image(write_image(volume, tmp_path / "series"))
    assert np.linalg.det(back.geometry.direction_matrix) > 0
    on_original_grid = sitk.Resample(
        to_sitk(back), to_sitk(volume), sitk.Transform(), sitk.sitkNearestNeighbor
    )
    np.testing.assert_array_equal(from_sitk(on_original_grid).array, volume.array)


def test_dicom_refuses_float_voxels_with_advice(tmp_path):
    volume = random_volume(dtype=np.float32)
    with pytest.raises(ImageWriteError, match="NIfTI, NRRD or MHA"):
        write_image(volume, tmp_path / "series")
    assert not (tmp_path / "series").exists()


def test_sheared_affine_is_kept_for_nifti_and_refused_by_itk(tmp_path):
    affine = np.array([[2.0, 0.3, 0, -10], [0, 2.0, 0, 5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    volume = Volume(np.ones((4, 4, 4), np.float32), Geometry.from_affine(affine))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-12)
    back = read_image(write_image(volume, tmp_path / "sheared.nii.gz"))
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    with pytest.raises(GeometryError, match="sheared"):
        write_image(volume, tmp_path / "sheared.mha")
    assert list(tmp_path.iterdir()) == [tmp_path / "sheared.nii.gz"]  # no half-written file


def test_write_leaves_no_staging_files(tmp_path):
    write_image(random_volume(), tmp_path / "a.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.zraw"]


def test_to_nibabel_sets_qform_and_sform(tmp_path):
    image = to_nibabel(random_volume(geometry=oblique_geometry(1, flipped=True)))
    assert int(image.header["qform_code"]) == 1
    assert int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-6)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(ImageReadError, match="no such file") as caught:
        read_image(tmp_path / "absent.nii.gz")
    assert caught.value.path == tmp_path / "absent.nii.gz"


def test_unknown_format_error_lists_formats(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match=r"unknown image format.*\.nrrd"):
        read_image(tmp_path / "scan.png")


def test_truncated_nifti_is_an_image_read_error(tmp_path):
    path = write_image(random_volume(shape=(20, 20, 20)), tmp_path / "image.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_nifti_writes_are_byte_reproducible(tmp_path):
    volume = random_volume()
    first = write_image(volume, tmp_path / "a.nii.gz").read_bytes()
    second = write_image(volume, tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    assert gzip.decompress(first)  # a valid gzip stream, not a stub


def test_a_file_is_never_replaced_by_a_dicom_folder(tmp_path):
    target = tmp_path / "NAME"
    target.write_text("a user's notes")
    volume = Volume(np.zeros((4, 4, 3), np.int16), Geometry((1, 1, 1), (0, 0, 0)))
    with pytest.raises(ImageWriteError, match="is a file"):
        write_image(volume, target)  # no image suffix: a DICOM series folder is asked for
    assert target.read_text() == "a user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NAME"]  # nothing moved aside
