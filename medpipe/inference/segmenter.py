"""`load_segmenter`: a trained segmentation model (one fold or an ensemble of folds) that
takes any scan and answers on that scan's exact grid.

The caller never resamples: the scan is turned to the training scans' orientation (an exact
axis permutation/flip), preprocessed with the plans stored beside the weights (crop,
normalise, resample), predicted by sliding windows (optionally mirrored; fold ensembles
average their probabilities), the probabilities resampled back to the raw grid and argmaxed,
and the axes turned back. The answer's grid is the input's own geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medpipe.data.labels import REGION_THRESHOLD, LabelScheme
from medpipe.device import autocast_dtype, pick_device
from medpipe.errors import MedpipeError
from medpipe.inference.images import ScanLike, as_kind, load_channels, stack_channels
from medpipe.inference.onnx_backend import read_onnx_model, uses_onnx
from medpipe.inference.plausibility import check_scan
from medpipe.io import Volume, image_suffix, orientation, reorient, write_image
from medpipe.models.sliding_window import predict_probabilities
from medpipe.planning.plans import Plans
from medpipe.postprocessing import Postprocessing
from medpipe.preprocessing import (
    PreprocessingPlan,
    preprocess_images,
    restore_label_from_probabilities,
    restore_probability_maps,
)
from medpipe.runs.loading import load_trained, read_run_plans, run_folders
from medpipe.runs.spec import SegmentationRunSpec


class Segmenter:
    """One or more trained folds of one model, with the plans that prepare their input."""

    def __init__(self, members: Sequence[tuple[nn.Module, SegmentationRunSpec]], plans: Plans,
                 device: torch.device, amp: bool = True) -> None:
        if not members:
            raise MedpipeError("no trained model to load")
        self.networks = [network for network, _ in members]
        self.spec = members[0][1]
        for _, other in members[1:]:
            for key in ("labels", "channel_names", "configuration", "model"):
                if getattr(other, key) != getattr(self.spec, key):
                    raise MedpipeError(f"the folds of an ensemble differ in {key!r}")
        self.plans = plans
        self.plan = PreprocessingPlan.from_plans(plans, self.spec.configuration)
        self.device = device
        self.dtype = autocast_dtype(device, amp)
        # nnU-Net's largest-component step, as decided on cross-validation (None: none)
        self.postprocessing: Postprocessing | None = None

    @property
    def labels(self) -> dict[str, int | tuple[int, ...]]:
        return dict(self.spec.labels)

    @property
    def channels(self) -> int:
        return self.spec.in_channels

    @property
    def labels_scheme(self) -> LabelScheme:
        """Plain labels (softmax, argmax) or regions (sigmoid, thresholds)."""
        return self.spec.label_scheme

    def predict(self, scan: ScanLike | Sequence[ScanLike], probabilities: bool = False,
                mirror: bool = False) -> Any:
        """Labels on SCAN's grid, as the kind passed in (a path gives a `Volume`); with
        PROBABILITIES, `(labels, probabilities)`, the latter a vector image (X, Y, Z, K)."""
        volumes, kind = self._load(scan)
        labels, maps = self.predict_volumes(volumes, mirror, probabilities)
        if probabilities:
            return as_kind(labels, kind), as_kind(maps, kind)
        return as_kind(labels, kind)

    def _load(self, scan: ScanLike | Sequence[ScanLike]) -> tuple[list[Volume], str]:
        """The channels of SCAN, refused or warned about before any work (`plausibility`)."""
        volumes, kind = load_channels(scan, self.channels)
        first = scan[0] if isinstance(scan, list | tuple) else scan
        check_scan(volumes, self.plan.spacing, self.plan.intensity_properties,
                   len(self.spec.labels), first if isinstance(first, str | Path) else None)
        return volumes, kind

    def predict_volumes(self, volumes: Sequence[Volume], mirror: bool = False,
                        probabilities: bool = False) -> tuple[Volume, Volume | None]:
        """Labels on the grid of VOLUMES (one per channel) and, with PROBABILITIES, the
        class probabilities there (else None: labels alone need far less memory)."""
        original = volumes[0]
        target = self.spec.orientation
        if target:
            volumes = [reorient(v, target) for v in volumes]
        data, _, properties = preprocess_images(stack_channels(volumes), volumes[0].geometry,
                                                self.plan)
        total = None
        for network in self.networks:
            probs = predict_probabilities(
                network, data, self.spec.patch_size, self.device,
                mirror_axes=(0, 1, 2) if mirror else (), dtype=self.dtype,
                sigmoid=self.labels_scheme.regions, classes=self.spec.out_channels,
            )
            total = probs if total is None else total + probs
        mean = (total / len(self.networks)).numpy()
        if not probabilities:
            labels = restore_label_from_probabilities(mean, properties, self.labels_scheme)
            if target:
                labels = reorient(labels, orientation(original.geometry))
            return original.with_array(labels.array), None
        scheme = self.labels_scheme
        maps = restore_probability_maps(mean, properties, background=not scheme.regions)
        if target:
            maps = reorient(maps, orientation(original.geometry))
        if scheme.regions:
            masks = np.moveaxis(maps.array > REGION_THRESHOLD, -1, 0)
            label = scheme.labels_from_regions(list(masks))
        else:
            dtype = np.uint8 if maps.array.shape[-1] < 256 else np.int16
            label = np.argmax(maps.array, axis=-1).astype(dtype)
        return original.with_array(label), original.with_array(maps.array)

    def predict_files(self, inputs: Sequence[ScanLike | Sequence[ScanLike]],
                      outputs: Sequence[str | Path], mirror: bool = False,
                      probabilities: bool = False, dicom_seg: bool = False) -> list[Path]:
        """Predict many scans with the model loaded once; each output written atomically.
        With PROBABILITIES, the class probabilities are written beside each label map
        (`probabilities_path`) as a float32 vector image on the same grid. With DICOM_SEG,
        each input is a DICOM series folder and its labels go out as a DICOM SEG
        referencing it (`dicom_seg`)."""
        if dicom_seg and probabilities:
            raise MedpipeError("probabilities are not written beside a DICOM SEG (its "
                               "segments are binary); predict to NIfTI for them")
        written = []
        for scan, output in zip(inputs, outputs, strict=True):
            volumes, _ = self._load(scan)
            labels, maps = self.predict_volumes(volumes, mirror, probabilities)
            if self.postprocessing is not None:
                labels = labels.with_array(self.postprocessing.apply(labels.array))
            if probabilities:
                write_image(maps.with_array(maps.array.astype(np.float32)),
                            probabilities_path(output))
            if dicom_seg:
                from medpipe.inference.dicom_seg import write_dicom_seg

                source = scan[0] if isinstance(scan, list | tuple) else scan
                written.append(write_dicom_seg(labels, Path(source), Path(output),
                                               self.labels, self.spec.model))
            else:
                written.append(write_image(labels, output))
        return written


def probabilities_path(labels_path: str | Path) -> Path:
    """Where the probabilities of a label map go: `CASE.nii.gz` -> `CASE_probabilities.nii.gz`
    (components in the order of the model's labels, background first)."""
    path = Path(labels_path)
    suffix = image_suffix(path) or path.suffix
    return path.with_name(f"{path.name[: len(path.name) - len(suffix)]}_probabilities{suffix}")


def load_segmenter(source: str | Path | Sequence[str | Path], checkpoint: str = "best",
                   device: str = "auto", backend: str = "torch",
                   amp: bool = True) -> Segmenter:
    """A segmenter from a run folder, a checkpoint file, a model folder holding `fold_K`
    run folders (an ensemble of them), a list of any of these, or an MLflow model URI
    (`models:/<model_id>`, `models:/<name>@<alias>`, `models:/<name>/<version>`); with
    BACKEND "onnxruntime", from a `.onnx` file of `medpipe export` (on the CPU, fp32).
    AMP: torch's mixed precision where the device has it natively (`autocast_dtype`)."""
    if uses_onnx(source, backend):
        network, spec, plans = read_onnx_model(source)
        if not isinstance(spec, SegmentationRunSpec):
            raise MedpipeError("this is a registration model; use load_registrator",
                               Path(source))
        return Segmenter([(network, spec)], plans, torch.device("cpu"), amp=False)
    torch_device = pick_device(device)
    members, plans = [], None
    for folder, name in run_folders(source, checkpoint):
        network, spec = load_trained(folder, name, torch_device)
        if not isinstance(spec, SegmentationRunSpec):
            raise MedpipeError("this is a registration model; use load_registrator",
                               folder.path)
        plans = plans or read_run_plans(folder)
        members.append((network, spec))
    return Segmenter(members, plans, torch_device, amp)
