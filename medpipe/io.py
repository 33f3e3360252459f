"""Read and write volumes with their geometry.

This is the one module that knows the conventions of nibabel (RAS+ affine, NIfTI) and
SimpleITK (LPS+ origin/direction; NRRD, MHA/MHD, DICOM). Everything else in medpipe sees a
`Volume`: a numpy array whose axes are the image's index axes (i, j, k), exactly as nibabel
returns them, plus a `Geometry` in ITK's LPS physical space. Keeping one convention inside
avoids the classic bug of a silently flipped left/right axis.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from medpipe.errors import GeometryError, ImageReadError, ImageWriteError, MedpipeError

if TYPE_CHECKING:
    import SimpleITK as sitk


def _sitk():
    """SimpleITK, imported where a non-NIfTI file or an ITK image is handled: a 50 MiB
    wheel that reading and writing NIfTI, training from preprocessed data and prediction
    from NIfTI never need (a GPU machine's environment may lack it)."""
    import SimpleITK

    return SimpleITK


# nibabel's RAS+ world and ITK's LPS+ world differ by a sign flip of the first two axes.
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
DICOM_INTEGER_DTYPES = (np.uint8, np.int8, np.uint16, np.int16)


@dataclass(frozen=True)
class Geometry:
    """Where voxels lie in the patient: ITK's spacing, origin and direction, in LPS mm.

    `direction` is the 3x3 matrix flattened row by row (as SimpleITK's `GetDirection`); its
    columns are the physical directions of the index axes i, j, k.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel index (i, j, k, 1) to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine(self) -> np.ndarray:
        """Voxel index (i, j, k, 1) to RAS millimetres: the affine nibabel would report."""
        affine = self.affine_lps
        affine[:3] = np.diag([-1.0, -1.0, 1.0, 1.0])[:3] @ affine
        return affine

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> Geometry:
        """Build from a nibabel (RAS+) affine; shear, if any, stays in `direction`."""
        affine = np.asarray(affine, dtype=np.float64)
        linear = _LPS_FROM_RAS @ affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing == 0):
            raise GeometryError(f"affine has a zero-length axis: {affine.tolist()}")
        direction = linear / spacing
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(direction)) < 1e-3:
            raise GeometryError("the affine's axes are (nearly) parallel or not finite: no "
                                "grid in space (a singular direction matrix)")
        origin = _LPS_FROM_RAS @ affine[:3, 3]
        return cls(
            spacing=_triplet(spacing),
            origin=_triplet(origin),
            direction=tuple(float(v) for v in direction.ravel()),
        )

    def is_close(self, other: Geometry, atol: float = 1e-4) -> bool:
        return not self.differences(other, atol)

    def differences(self, other: Geometry, atol: float = 1e-4) -> list[str]:
        """Human-readable list of the fields that differ by more than `atol`."""
        found = []
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(mine, theirs, rtol=0, atol=atol):
                found.append(f"{name} {_fmt(mine)} vs {_fmt(theirs)}")
        return found

    def to_json(self) -> dict[str, list[float]]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> Geometry:
        return cls(
            spacing=_triplet(data["spacing"]),
            origin=_triplet(data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )


@dataclass(frozen=True, eq=False)
class Volume:
    """A voxel array on a grid. Axes are (i, j, k) or (i, j, k, component)."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid, new voxels (for results that must land on the input's grid)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise GeometryError(f"array shape {array.shape} does not fit grid {self.shape}")
        return Volume(array, self.geometry)


def image_suffix(path: str | Path) -> str:
    """The format suffix of a path ('.nii.gz', '.mha', ...), or '' for a folder/unknown."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


# --------------------------------------------------------------------------- conversions


def from_nibabel(image: nib.spatialimages.SpatialImage) -> Volume:
    """Volume from a nibabel image; scaling (scl_slope) is applied, native dtype kept otherwise."""
    array = np.asarray(image.dataobj)
    if array.ndim == 5 and array.shape[3] == 1:  # ITK vector images: (X, Y, Z, 1, C)
        array = array[:, :, :, 0, :]
    return Volume(array, Geometry.from_affine(image.affine))


def to_nibabel(volume: Volume) -> nib.Nifti1Image:
    """NIfTI image with qform and sform both set (code 1, scanner), as ITK writes them."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 4:  # vector image: NIfTI keeps components on the 5th axis
        array = array[:, :, :, None, :]
    image = nib.Nifti1Image(array, volume.geometry.affine)
    image.set_qform(volume.geometry.affine, code=1)
    image.set_sform(volume.geometry.affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    if array.ndim == 5:
        image.header.set_intent("vector")
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """Volume from a SimpleITK image (array axes reordered from (k, j, i) to (i, j, k))."""
    if image.GetDimension() != 3:
        raise GeometryError(f"expected a 3D image, got {image.GetDimension()}D")
    array = _sitk().GetArrayFromImage(image)
    axes = (2, 1, 0, 3) if image.GetNumberOfComponentsPerPixel() > 1 else (2, 1, 0)
    geometry = Geometry(
        spacing=_triplet(image.GetSpacing()),
        origin=_triplet(image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )
    return Volume(np.ascontiguousarray(array.transpose(axes)), geometry)


def to_sitk(volume: Volume) -> sitk.Image:
    """SimpleITK image on the same grid; ITK needs an orthonormal direction (no shear)."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 3:
        image = _sitk().GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    elif array.ndim == 4:
        image = _sitk().GetImageFromArray(
            np.ascontiguousarray(array.transpose(2, 1, 0, 3)), isVector=True
        )
    else:
        raise GeometryError(f"cannot make an ITK image of a {array.ndim}D array")
    image.SetSpacing(volume.geometry.spacing)
    image.SetOrigin(volume.geometry.origin)
    direction = volume.geometry.direction_matrix
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise GeometryError(
            "ITK images need an orthonormal direction; this affine is sheared: "
            f"{_fmt(direction.ravel())}"
        )
    image.SetDirection(volume.geometry.direction)
    return image


# --------------------------------------------------------------------------- orientation


def orientation(geometry: Geometry) -> str:
    """Axis codes of the index axes in RAS+ terms, as nibabel names them ("RAS", "LPS",
    "PIR", ...): which anatomical direction each array axis increases towards."""
    return "".join(nib.orientations.aff2axcodes(geometry.affine))


def reorient(volume: Volume, codes: str) -> Volume:
    """The same voxels with array axes permuted and flipped so that they run along CODES.

    Exact (no interpolation): every voxel keeps its physical position, so reorienting back
    with the original codes returns the original array and grid. A network trained on one
    orientation sees that orientation whatever the file's.
    """
    start = nib.orientations.io_orientation(volume.geometry.affine)
    end = nib.orientations.axcodes2ornt(tuple(codes))
    transform = nib.orientations.ornt_transform(start, end)
    array = nib.orientations.apply_orientation(volume.array, transform)
    affine = volume.geometry.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape[:3])
    return Volume(np.ascontiguousarray(array), Geometry.from_affine(affine))


# --------------------------------------------------------------------------- reading


def read_image(path: str | Path, series_id: str | None = None) -> Volume:
    """Read a NIfTI, NRRD, MHA/MHD file or a DICOM series folder.

    NIfTI goes through nibabel (whose sform/qform rules are the reference), the other formats
    through SimpleITK. Errors name the file and never leave a half-read volume behind.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError("no such file or folder", path)
    try:
        if path.is_dir():
            return read_dicom_series(path, series_id)
        suffix = image_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            return from_nibabel(nib.load(path))
        if suffix in ITK_SUFFIXES:
            return from_sitk(_sitk().ReadImage(str(path)))
    except ImageReadError:
        raise
    except Exception as error:  # nibabel, zlib, ITK: all mean "this file is unreadable"
        raise ImageReadError(f"cannot read ({_one_line(error)})", path) from error
    raise ImageReadError(
        f"unknown image format; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
        "or a DICOM series folder",
        path,
    )


def read_dicom_series(folder: Path, series_id: str | None = None) -> Volume:
    """Read one DICOM series; slices are ordered by position along the slice normal (GDCM)."""
    reader = _sitk().ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError("no DICOM series found in this folder", folder)
    if series_id is None:
        if len(series) > 1:
            raise ImageReadError(
                f"holds {len(series)} DICOM series ({', '.join(series)}); "
                "pass series_id to choose one",
                folder,
            )
        series_id = series[0]
    elif series_id not in series:
        raise ImageReadError(f"no DICOM series {series_id}; found {', '.join(series)}", folder)
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
    return from_sitk(reader.Execute())


# --------------------------------------------------------------------------- writing


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written file under the final name.

    The format follows the suffix; a name without any suffix is written as a DICOM series
    folder, and any other suffix is an error (never a folder named `seg.png`). Returns the
    path written.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix:
        if path.suffix:
            raise ImageWriteError(
                f"unknown image format {path.suffix!r}; use one of "
                f"{', '.join(SUPPORTED_SUFFIXES)}, or a name without a suffix for a DICOM "
                "series folder", path)
        write_dicom_series(volume, path)
        return path
    with atomic_output(path) as staging:
        try:
            if suffix in NIFTI_SUFFIXES:
                nib.save(to_nibabel(volume), staging)
            else:
                _sitk().WriteImage(to_sitk(volume), str(staging), useCompression=True)
        except GeometryError:
            raise
        except Exception as error:
            raise ImageWriteError(f"cannot write ({_one_line(error)})", path) from error
    return path


_IMAGE_STORAGE = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def write_dicom_series(volume: Volume, folder: str | Path, modality: str = "OT") -> Path:
    """Write an integer volume as a DICOM series, one file per slice along k.

    DICOM stores a right-handed frame (slice normal = row x column direction), so a
    left-handed grid is written flipped along k: the same voxels at the same physical places.
    """
    folder = Path(folder)
    array = volume.array
    if array.ndim != 3:
        raise ImageWriteError("DICOM series need a scalar 3D volume", folder)
    array = _dicom_pixels(array, folder)
    geometry = volume.geometry
    if np.linalg.det(geometry.direction_matrix) < 0:
        array = array[:, :, ::-1]
        flipped = geometry.direction_matrix.copy()
        flipped[:, 2] *= -1
        last = geometry.affine_lps @ np.array([0, 0, volume.shape[2] - 1, 1.0])
        geometry = Geometry(geometry.spacing, _triplet(last[:3]), tuple(flipped.ravel()))
    image = to_sitk(Volume(np.ascontiguousarray(array), geometry))
    direction = geometry.direction_matrix
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    uid_root = "1.2.826.0.1.3680043.2.1125." + str(uuid.UUID(int=_content_seed(array)).int)[:20]
    tags = {
        "0008|0060": modality,
        # row spacing \ column spacing: spacing along j, then along i
        "0028|0030": f"{geometry.spacing[1]:.10g}\\{geometry.spacing[0]:.10g}",
        "0020|000d": uid_root + ".1",
        "0020|000e": uid_root + ".2",
        "0020|0052": uid_root + ".4",  # frame of reference: what a DICOM SEG lies in
        "0020|0037": orientation,
        "0018|0050": f"{geometry.spacing[2]:.10g}",
        "0008|0008": "DERIVED\\SECONDARY",
    }
    if modality in _IMAGE_STORAGE:  # CT/MR Image Storage, not GDCM's Secondary Capture
        tags["0008|0016"] = _IMAGE_STORAGE[modality]
    writer = _sitk().ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with atomic_folder(folder) as staging:
        for k in range(image.GetDepth()):
            slice_image = image[:, :, k]
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in position))
            slice_image.SetMetaData("0020|0013", str(k + 1))
            slice_image.SetMetaData("0008|0018", f"{uid_root}.3.{k + 1}")
            writer.SetFileName(str(staging / f"slice_{k:04d}.dcm"))
            writer.Execute(slice_image)
    return folder


def _dicom_pixels(array: np.ndarray, folder: Path) -> np.ndarray:
    if array.dtype in DICOM_INTEGER_DTYPES:
        return array
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        low, high = float(array.min()), float(array.max())
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            return array.astype(np.int16)
    raise ImageWriteError(
        "DICOM writing supports integer voxels within int16 range; "
        f"got {array.dtype} — write NIfTI, NRRD or MHA instead",
        folder,
    )


def _content_seed(array: np.ndarray) -> int:
    """Deterministic UIDs: the same volume gives the same series, so reruns are byte-stable."""
    import hashlib

    return int.from_bytes(hashlib.sha256(array.tobytes()).digest()[:16], "big")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a staging path with the final name inside a hidden temporary folder.

    Writers infer the format (and MHD its data-file name) from the name, so the staging file
    keeps it. On success, companion files move first and the named file last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staging = staging_dir / path.name
        yield staging
        for companion in staging_dir.iterdir():
            if companion.name != path.name:
                os.replace(companion, path.parent / companion.name)
        os.replace(staging, path)
        _remove_stale_staging(path)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


STALE_STAGING_SECONDS = 3600


def _remove_stale_staging(path: Path) -> None:
    """Staging folders of PATH that a killed writer left behind: an hour old, no writer of
    the same name can still be filling them."""
    limit = time.time() - STALE_STAGING_SECONDS
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*"):
        try:
            if stale.is_dir() and stale.stat().st_mtime < limit:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a staging folder that replaces `folder` only once it is complete; a file of that
    name is never replaced by a folder."""
    if folder.exists() and not folder.is_dir():
        raise ImageWriteError("exists and is a file; a path without an image suffix is "
                              "written as a DICOM series folder", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield staging
        if folder.exists():
            retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, retired)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _triplet(values: object) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)  # type: ignore[union-attr]
    return (x, y, z)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in np.ravel(values)) + ")"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


# --------------------------------------------------------------------------- JSON


def write_json(data: object, path: str | Path, finite: bool = False) -> Path:
    """Write JSON atomically (indented, keys in given order) so reruns diff cleanly. FINITE:
    refuse NaN and infinity (not JSON; a fingerprint or plans holding them is broken)."""
    import json

    path = Path(path)
    try:
        text = json.dumps(data, indent=2, allow_nan=not finite) + "\n"
    except ValueError:
        raise MedpipeError("refused to write NaN or infinity (the inputs hold values that "
                           "cannot be summarised)", path) from None
    with atomic_output(path) as staging:
        staging.write_text(text)
    return path
