"""How a dataset's labels become what a network predicts, and back.

Two schemes, as nnU-Net has them. Plain labels: one softmax channel per label (background
first), a voxel's class is the argmax. Region-based labels (`"whole_tumour": [1, 2, 3]`
with `regions_class_order` in `dataset.json`, as BraTS uses): one sigmoid channel per region
(background has none), regions overlap, a voxel is in a region when its probability is > 0.5,
and a label map is rebuilt by writing each region's label from `regions_class_order` in
turn, later regions over earlier ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REGION_THRESHOLD = 0.5


@dataclass(frozen=True)
class LabelScheme:
    names: tuple[str, ...]  # the foreground classes or regions, in output-channel order
    values: tuple[tuple[int, ...], ...]  # the label values each one covers
    regions_class_order: tuple[int, ...] | None = None  # set: region-based

    @classmethod
    def from_labels(cls, labels: Mapping[str, int | Sequence[int]],
                    regions_class_order: Sequence[int] | None = None) -> LabelScheme:
        entries = [(name, tuple(value) if isinstance(value, list | tuple) else (int(value),))
                   for name, value in labels.items()]
        foreground = [(name, values) for name, values in entries if values != (0,)]
        order = tuple(regions_class_order) if regions_class_order else None
        if order is not None and len(order) != len(foreground):
            raise ValueError(f"regions_class_order has {len(order)} entries for "
                             f"{len(foreground)} regions")
        return cls(tuple(n for n, _ in foreground), tuple(v for _, v in foreground), order)

    @property
    def regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region, or one per label including background."""
        return len(self.names) if self.regions else len(self.names) + 1

    @property
    def channel_names(self) -> dict[int, str]:
        """Output channel index (1-based over the foreground) -> class or region name."""
        return {index: name for index, name in enumerate(self.names, start=1)}

    @property
    def classes(self) -> dict[str, tuple[int, ...]]:
        """Name -> label values it covers: what is scored, per class or region."""
        return dict(zip(self.names, self.values, strict=True))

    @property
    def scored_classes(self) -> dict[str, int | tuple[int, ...]]:
        """What `metrics.segmentation_metrics` scores: a class's label value, or the values
        a region covers (scored as their union)."""
        return {name: values if self.regions else values[0]
                for name, values in self.classes.items()}

    def region_masks(self, label: np.ndarray) -> np.ndarray:
        """(R, ...) boolean masks of each region in a label map."""
        return np.stack([np.isin(label, values) for values in self.values])

    def labels_from_regions(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        """A label map from region masks: each region's label written in turn."""
        label = np.zeros(masks[0].shape, np.uint8 if max(self.regions_class_order) < 256
                         else np.int16)
        for mask, value in zip(masks, self.regions_class_order, strict=True):
            label[mask] = value
        return label


class HasLabels:
    """For typed artifacts that carry a dataset's `labels`, `regions_class_order` and
    `channel_names` (the plans, a run description): what the network takes and predicts."""

    labels: Mapping[str, int | Sequence[int]]
    regions_class_order: Sequence[int] | None
    channel_names: Mapping[str, str]

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme.from_labels(self.labels, self.regions_class_order)

