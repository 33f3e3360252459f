"""The run description (`model.json`): what defines a trained run, as frozen typed objects.

Training builds a `RunSpec` once and writes it; evaluation, inference, tracking and the
MLflow model read it back with `read_run_spec` and use attributes, never string keys. Its
`run_hash` covers everything that changes the result (not the loader processes, the device
or how often validation runs), so a resume with other settings is refused.

`model.json` is written by medpipe only: keys that older versions wrote and this one no
longer needs are ignored when it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, computed_field

from medpipe.config import ClassicalSettings, NetworkRegistrationSettings
from medpipe.data.labels import HasLabels
from medpipe.errors import MedpipeError
from medpipe.io import write_json
from medpipe.planning.plans import ArchitectureKwargs, Triplet
from medpipe.runs.folder import RunFolder
from medpipe.training_settings import TrainingConfig

if TYPE_CHECKING:
    from medpipe.models import ModelOptions, NetworkShape

# settings that do not change what is learned: left out of the run hash
NOT_HASHED_TRAINING = {"num_workers", "device", "val_every"}


class RunSpec(BaseModel, HasLabels):
    """What every run records: the model, its data and fold, and how it was trained."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task: str
    model: str
    options: dict[str, Any]  # the model's options (validated by its options type)
    configuration: str  # the plans configuration the data was prepared with
    labels: dict[str, int | tuple[int, ...]]
    regions_class_order: tuple[int, ...] | None = None  # set: region-based labels
    channel_names: dict[str, str]
    dataset_name: str
    data_hash: str | None
    fold: int
    orientation: str | None  # axis codes of the training scans, None when they differ
    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    training: TrainingConfig

    @computed_field
    @property
    def run_hash(self) -> str:
        stable = self.model_dump(mode="json", exclude={
            "run_hash": True, "training": dict.fromkeys(NOT_HASHED_TRAINING, True)})
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def class_names(self) -> dict[int, str]:
        """What the task's per-class scores are numbered by -> name: the label value of
        each foreground class, or the 1-based channel of each region."""
        scheme = self.label_scheme
        if scheme.regions:
            return scheme.channel_names
        return {values[0]: name for name, values in scheme.classes.items()}

    @property
    def model_options(self) -> ModelOptions:
        from medpipe.models import parse_options

        return parse_options(self.model, self.options)

    @property
    def network_shape(self) -> NetworkShape:
        raise NotImplementedError

    @property
    def run_name(self) -> str:
        return f"{self.model}_fold_{self.fold}"


class SegmentationRunSpec(RunSpec):
    task: Literal["segmentation"] = "segmentation"
    out_channels: int
    architecture: ArchitectureKwargs  # the plans' topology (nnunet builds from it)
    patch_size: Triplet
    batch_size: int
    batch_dice: bool

    @property
    def network_shape(self) -> NetworkShape:
        from medpipe.models import NetworkShape

        return NetworkShape(self.in_channels, self.out_channels, self.architecture)


class RegistrationRunSpec(RunSpec):
    task: Literal["registration"] = "registration"
    batch_size: int
    registration: NetworkRegistrationSettings
    classical: ClassicalSettings  # the pre-alignment's settings
    grid_shape: Triplet  # the network's padded grid
    reference_case: str  # the case every training case is pre-aligned to
    unlabelled_cases: tuple[str, ...] = ()  # training scans without labels, paired too

    @property
    def network_shape(self) -> NetworkShape:
        from medpipe.models import NetworkShape

        return NetworkShape(self.in_channels, 3)  # a displacement per spatial axis


AnyRunSpec = Annotated[SegmentationRunSpec | RegistrationRunSpec, Field(discriminator="task")]
_ADAPTER = TypeAdapter(AnyRunSpec)


def write_run_spec(spec: RunSpec, folder: RunFolder) -> Path:
    return write_json(spec.model_dump(mode="json"), folder.model_file)


def read_run_spec(folder: RunFolder) -> SegmentationRunSpec | RegistrationRunSpec:
    """The description of the run in FOLDER; errors say what is wrong with model.json."""
    path = folder.model_file
    if not path.is_file():
        raise MedpipeError("not a run folder: model.json is missing", folder.path)
    try:
        return _ADAPTER.validate_json(path.read_bytes())
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'model.json'}: {e['msg']}"
            for e in error.errors()[:5])
        raise MedpipeError(f"invalid run description: {problems}", path) from None
