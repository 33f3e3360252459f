"""What preprocessing did to one case, and so how to undo it: `CaseProperties`.

Written beside each preprocessed case as `CASE.json` (nnU-Net's key names) and passed in
memory from `preprocess_images` to the functions that map a prediction back to the raw grid;
the geometry stays a `Geometry` in memory and becomes JSON only in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medpipe.errors import DatasetError
from medpipe.io import Geometry, write_json
from medpipe.preprocessing.resampling import resized_geometry

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class CaseProperties:
    geometry: Geometry  # the raw grid
    shape_before_cropping: Shape
    bbox_used_for_cropping: tuple[tuple[int, int], ...]  # [start, stop) per axis
    shape_after_cropping_and_before_resampling: Shape
    spacing_before_resampling: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape_after_resampling: Shape
    separate_axis: int | None  # resampled on its own (nearest neighbour), if anisotropic
    case_id: str | None = None
    # label value -> (n, 3) voxel positions on the preprocessed grid, for oversampling
    # (None for a case without labels)
    class_locations: dict[int, np.ndarray] | None = None

    @property
    def crop_slices(self) -> tuple[slice, ...]:
        """Where the cropped region lies in the raw array."""
        return tuple(slice(lo, hi) for lo, hi in self.bbox_used_for_cropping)

    @property
    def preprocessed_geometry(self) -> Geometry:
        """Where the voxels of the preprocessed array lie: the raw grid, cropped, rescaled."""
        return resized_geometry(
            self.geometry, self.shape_after_cropping_and_before_resampling,
            self.shape_after_resampling, start=[lo for lo, _ in self.bbox_used_for_cropping])

    def with_case(self, case_id: str,
                  class_locations: dict[int, np.ndarray] | None) -> CaseProperties:
        return replace(self, case_id=case_id, class_locations=class_locations)

    def to_json(self) -> dict:
        data = {
            "geometry": self.geometry.to_json(),
            "shape_before_cropping": list(self.shape_before_cropping),
            "bbox_used_for_cropping": [list(b) for b in self.bbox_used_for_cropping],
            "shape_after_cropping_and_before_resampling":
                list(self.shape_after_cropping_and_before_resampling),
            "spacing_before_resampling": list(self.spacing_before_resampling),
            "spacing": list(self.spacing),
            "shape_after_resampling": list(self.shape_after_resampling),
            "separate_axis": self.separate_axis,
        }
        if self.case_id is not None:
            data["case_id"] = self.case_id
        if self.class_locations is not None:
            data["class_locations"] = {str(value): points.tolist()
                                       for value, points in self.class_locations.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> CaseProperties:
        def shape(key: str) -> Shape:
            return tuple(int(v) for v in data[key])

        return cls(
            geometry=Geometry.from_json(data["geometry"]),
            shape_before_cropping=shape("shape_before_cropping"),
            bbox_used_for_cropping=tuple((int(lo), int(hi))
                                         for lo, hi in data["bbox_used_for_cropping"]),
            shape_after_cropping_and_before_resampling=shape(
                "shape_after_cropping_and_before_resampling"),
            spacing_before_resampling=tuple(float(v) for v in data["spacing_before_resampling"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            shape_after_resampling=shape("shape_after_resampling"),
            separate_axis=data["separate_axis"],
            case_id=data.get("case_id"),
            class_locations=None if "class_locations" not in data else {
                int(value): np.asarray(points, dtype=np.int64).reshape(-1, 3)
                for value, points in data["class_locations"].items()},
        )


def write_properties(properties: CaseProperties, path: Path) -> Path:
    return write_json(properties.to_json(), path)


def read_properties(path: Path) -> CaseProperties:
    """A case's properties; an incomplete or foreign file is a `DatasetError` naming it."""
    try:
        return CaseProperties.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"cannot read case properties ({error})", path) from None
