"""`load_registrator`: a trained registration network for any pair of scans.

Both scans are turned to the training orientation, cropped and normalised with the stored
plans, and resampled onto the network's grid (`NetworkRegistration`); the network's field
is pre-aligned and composed into an ITK displacement field on the fixed scan's own grid
(see `registration.fields`), through which the moving scan and its labels are warped. Everything
returned lies on the fixed scan's grid; `field` alone skips the warps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from medpipe.config import InstanceOptimisationSettings
from medpipe.device import pick_device
from medpipe.errors import MedpipeError
from medpipe.inference.images import ScanLike, as_kind, load_channels, load_scan, stack_channels
from medpipe.inference.onnx_backend import read_onnx_model, uses_onnx
from medpipe.io import Volume, from_sitk, reorient, write_image
from medpipe.planning.plans import Plans
from medpipe.preprocessing import PreprocessingPlan, crop_and_normalise, resized_geometry
from medpipe.registration.fields import warp_with_field
from medpipe.registration.network import NetworkRegistration
from medpipe.registration.pairs import RegistrationCase
from medpipe.runs.loading import load_trained, read_run_plans, run_folders
from medpipe.runs.spec import RegistrationRunSpec


@dataclass(frozen=True)
class RegistrationResult:
    """All on the fixed scan's grid, as the kind the fixed scan was passed as. `field` is
    ITK's displacement field (LPS mm): `SimpleITK.Resample(moving, fixed,
    SimpleITK.DisplacementFieldTransform(field))` reproduces `warped`."""

    warped: Any
    field: Any
    warped_labels: Any | None = None

    def write(self, folder: str | Path, suffix: str = ".nii.gz") -> dict[str, Path]:
        """warped, field (and warped_labels) files in FOLDER, each written atomically."""
        folder = Path(folder)
        written = {}
        for name in ("warped", "field", "warped_labels"):
            value = getattr(self, name)
            if value is not None:
                written[name] = write_image(_as_volume(value), folder / f"{name}{suffix}")
        return written


class Registrator:
    def __init__(self, network: torch.nn.Module, spec: RegistrationRunSpec, plans: Plans,
                 device: torch.device,
                 instance_optimisation: InstanceOptimisationSettings | None = None,
                 amp: bool = True) -> None:
        self.spec = spec
        self.plan = PreprocessingPlan.from_plans(plans, spec.configuration)
        self.method = NetworkRegistration(network, spec, device,
                                          spec.registration.spacing or self.plan.spacing,
                                          instance_optimisation, amp)

    @property
    def channels(self) -> int:
        return self.spec.in_channels

    def register(self, moving: ScanLike | list, fixed: ScanLike | list,
                 moving_labels: ScanLike | None = None) -> RegistrationResult:
        """MOVING registered to FIXED: the field, the warped scan (and labels)."""
        moving_volumes, _ = load_channels(moving, self.channels)
        fixed_volumes, kind = load_channels(fixed, self.channels)
        field = self._field(moving, moving_volumes, fixed, fixed_volumes)
        warped = warp_with_field(moving_volumes[0], field)
        labels = None
        if moving_labels is not None:
            labels = warp_with_field(load_scan(moving_labels), field, labels=True)
        return RegistrationResult(
            warped=as_kind(warped, kind),
            field=field if kind == "sitk" else as_kind(from_sitk(field), kind),
            warped_labels=as_kind(labels, kind) if labels is not None else None,
        )

    def field(self, moving: ScanLike | list, fixed: ScanLike | list) -> sitk.Image:
        """Only the ITK displacement field on FIXED's grid (what `register` warps with;
        nothing is resampled at the fixed scan's resolution but the field itself)."""
        moving_volumes, _ = load_channels(moving, self.channels)
        fixed_volumes, _ = load_channels(fixed, self.channels)
        return self._field(moving, moving_volumes, fixed, fixed_volumes)

    def _field(self, moving_scans: ScanLike | list, moving: list[Volume],
               fixed_scans: ScanLike | list, fixed: list[Volume]) -> sitk.Image:
        for name, scans, volumes in (("moving", moving_scans, moving),
                                     ("fixed", fixed_scans, fixed)):
            items = list(scans) if isinstance(scans, list | tuple) else [scans]
            for item, volume in zip(items, volumes, strict=True):
                if float(volume.array.min()) == float(volume.array.max()):
                    raise MedpipeError(f"the {name} scan is constant (every voxel "
                                       f"{float(volume.array.min()):g}): there is nothing to "
                                       "register it by",
                                       item if isinstance(item, str | Path) else None)
        target = fixed[0]
        cases = [self._prepare(name, volumes)
                 for name, volumes in (("moving", moving), ("fixed", fixed))]
        return self.method(cases[0], cases[1], target.geometry, target.shape)

    def _prepare(self, name: str, volumes: list[Volume]) -> RegistrationCase:
        """The scan as the network sees it: in the training orientation, cropped and
        normalised as the plans say, on its own grid; `NetworkRegistration` resamples it
        straight to the network's grid. Training resampled from the plans' spacing, so for
        a scan at another resolution the two differ by one resampling (on the demo's scans,
        at the plans' spacing, the inputs are the same)."""
        orientation = self.spec.orientation
        if orientation:
            volumes = [reorient(v, orientation) for v in volumes]
        cropped, data = crop_and_normalise(stack_channels(volumes), self.plan)
        shape = data.shape[1:]
        geometry = resized_geometry(volumes[0].geometry, shape, shape,
                                    start=[lo for lo, _ in cropped.bbox])
        return RegistrationCase(name, data, None, geometry)


def load_registrator(source: str | Path, checkpoint: str = "best", device: str = "auto",
                     refine_steps: int = 0,
                     refine_spacing: tuple[float, float, float] | None = None,
                     backend: str = "torch", amp: bool = True) -> Registrator:
    """A registrator from a run folder, a checkpoint file or an MLflow model URI; with
    REFINE_STEPS > 0 each pair's field is refined by that many instance-optimisation steps
    (`registration.instance_optimisation`'s other defaults: what NETWORK_io scores), on the
    network's grid or on one of REFINE_SPACING (mm). BACKEND "onnxruntime": the network of a
    `.onnx` file of `medpipe export` (CPU, fp32); AMP: torch's native mixed precision."""
    refinement = (InstanceOptimisationSettings(steps=refine_steps, spacing=refine_spacing)
                  if refine_steps else None)
    if uses_onnx(source, backend):
        network, spec, plans = read_onnx_model(source)
        if not isinstance(spec, RegistrationRunSpec):
            raise MedpipeError("this is a segmentation model; use load_segmenter", Path(source))
        return Registrator(network, spec, plans, torch.device("cpu"), refinement, amp=False)
    members = run_folders(source, checkpoint)
    if len(members) != 1:
        raise MedpipeError("a registrator is one trained network; name one fold", Path(source))
    folder, name = members[0]
    torch_device = pick_device(device)
    network, spec = load_trained(folder, name, torch_device)
    if not isinstance(spec, RegistrationRunSpec):
        raise MedpipeError("this is a segmentation model; use load_segmenter", folder.path)
    return Registrator(network, spec, read_run_plans(folder), torch_device, refinement, amp)


def _as_volume(value: Any) -> Volume:
    if isinstance(value, Volume):
        return value
    if isinstance(value, sitk.Image):
        return from_sitk(value)
    from medpipe.io import from_nibabel

    return from_nibabel(value)
