"""A prediction as a DICOM Segmentation (highdicom): the object PACS and viewers (OHIF,
3D Slicer, dcmqi) read for a segmentation, referencing the series it was computed from.

One binary segment per label (or region) of the model, named as in dataset.json, each frame
on one source slice: the prediction lies on the series' own grid (`Segmenter` answers on the
input's grid), so frame k of a segment is the label map's slice at the source image's
position, found through the grid's geometry, never by file order. Empty frames are left out
(highdicom's default). Regions (nnU-Net's region-based labels) may overlap: each segment is
its own mask, the union of the region's label values in the label map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.io import Volume, atomic_output

_GRID_TOLERANCE = 1e-2  # voxels: how far a source slice may lie from the grid's


def read_series(folder: Path) -> list:
    """The DICOM datasets of the one series in FOLDER (pydicom), pixel data included."""
    import pydicom

    datasets = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            try:
                datasets.append(pydicom.dcmread(path))
            except pydicom.errors.InvalidDicomError:
                continue
    series = {d.SeriesInstanceUID for d in datasets}
    if len(series) != 1:
        raise MedpipeError(f"holds {len(series)} DICOM series; a DICOM SEG references one",
                           folder)
    return datasets


def slice_indices(labels: Volume, datasets: list, folder: Path) -> list[int]:
    """For each source image, the index k of the label map's slice lying where it lies."""
    to_index = np.linalg.inv(labels.geometry.affine_lps)
    indices = []
    for dataset in datasets:
        position = np.append(np.asarray(dataset.ImagePositionPatient, float), 1.0)
        i, j, k = (to_index @ position)[:3]
        shape = (int(dataset.Columns), int(dataset.Rows))
        if (abs(i) > _GRID_TOLERANCE or abs(j) > _GRID_TOLERANCE
                or abs(k - round(k)) > _GRID_TOLERANCE or shape != labels.shape[:2]
                or not 0 <= round(k) < labels.shape[2]):
            raise MedpipeError("the prediction does not lie on this series' grid (a DICOM "
                               "SEG needs the source images' own slices)", folder)
        indices.append(round(k))
    return indices


def write_dicom_seg(labels: Volume, source: Path, output: Path,
                    label_values: Mapping[str, int | tuple[int, ...]], model: str) -> Path:
    """LABELS (on the grid of the DICOM series in folder SOURCE) as a DICOM SEG at OUTPUT,
    one segment per non-background entry of LABEL_VALUES, in their order."""
    from importlib.metadata import version

    import highdicom as hd
    from pydicom.sr.codedict import codes

    software = version("medpipe")  # the installed package's version

    source, output = Path(source), Path(output)
    datasets = read_series(source)
    indices = slice_indices(labels, datasets, source)
    segments = [(name, (value,) if isinstance(value, int) else tuple(value))
                for name, value in label_values.items() if value not in (0, (0,))]
    # (frames, rows, columns, segments): frame f is source image f; rows run along j
    masks = np.stack([np.isin(labels.array, values) for _, values in segments], axis=-1)
    pixels = np.ascontiguousarray(np.moveaxis(masks[:, :, indices], 2, 0).transpose(0, 2, 1, 3))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medpipe {model}", version=software,
        family=codes.cid7162.ArtificialIntelligence)
    # a label's meaning is not known to medpipe: every segment is typed as a generic tissue
    # (SNOMED CT 85756007 "Tissue")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, (name, _) in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medpipe",
        manufacturer_model_name=model, software_versions=software,
        device_serial_number="none", series_description=f"medpipe {model}"[:64])
    with atomic_output(output) as staging:
        seg.save_as(staging)
    return output
