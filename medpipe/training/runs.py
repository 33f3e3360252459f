"""Training runs, shared by every task: describing a run (`RunSpec`), guarding its folder
against a resume with other settings, and the one function that wires a task and a network
into the engine with tracking and progress. The folder's layout is `runs.folder`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe import tracked
from medpipe.config import PipelineConfig
from medpipe.data.splits import fold_case_ids
from medpipe.errors import MedpipeError
from medpipe.io import orientation, write_json
from medpipe.planning.plans import Plans, read_plans
from medpipe.preprocessing.cases import case_files
from medpipe.preprocessing.properties import read_properties
from medpipe.runs.folder import RunFolder
from medpipe.runs.lock import lock_run_folder, unlock_run_folder
from medpipe.runs.spec import RunSpec, read_run_spec, write_run_spec
from medpipe.tracking import git_commit, open_tracker
from medpipe.training.callbacks import ProgressPrinter, TrackingCallback
from medpipe.training.distributed import ONE_PROCESS, Processes, stop
from medpipe.training.engine import EngineSettings, Trainer, TrainingTask
from medpipe.training.optim import build_optimizer, build_scheduler
from medpipe.training_settings import TrainingConfig


def training_orientation(config: PipelineConfig, case_ids: list[str]) -> str | None:
    """The orientation (axis codes, e.g. "LPS") shared by the training scans, which
    inference turns every new scan into; None when they differ (nothing is reoriented)."""
    codes = set()
    for case_id in case_ids:
        _, properties_file = case_files(config.preprocessed_dir, case_id)
        if properties_file.is_file():
            codes.add(orientation(read_properties(properties_file).geometry))
    return codes.pop() if len(codes) == 1 else None


def model_plans(config: PipelineConfig, model: str) -> Plans:
    """The plans MODEL trains with (`PipelineConfig.plans_file_for`): another planner's
    must preprocess the configuration as plans.json does, whose cases it trains on."""
    path = config.plans_file_for(model)
    plans = read_plans(path)
    if path != config.plans_file:
        own = plans.configuration(config.configuration).data_identifier
        shared = read_plans(config.plans_file).configuration(config.configuration)
        if own != shared.data_identifier:
            raise MedpipeError(
                f"{model}'s plans preprocess {config.configuration} differently from "
                f"plans.json ({own} vs {shared.data_identifier}); set `planner: "
                f"{config.planner_for(model)}` for the whole workflow instead", path)
    return plans


def common_fields(config: PipelineConfig, plans: Plans, model: str, fold: int,
                  training: TrainingConfig) -> dict[str, Any]:
    """The `RunSpec` fields every task fills the same way; each task adds its own."""
    train_ids, val_ids = fold_case_ids(config.splits_file, fold)
    return {
        "model": model,
        "options": config.model_options(model).model_dump(mode="json"),
        "configuration": config.configuration,
        "labels": plans.labels,
        "regions_class_order": plans.regions_class_order,
        "channel_names": plans.channel_names,
        "dataset_name": plans.dataset_name,
        "data_hash": plans.data_hash,
        "fold": fold,
        "orientation": training_orientation(config, train_ids),
        "train_cases": train_ids,
        "val_cases": val_ids,
        "training": training,
    }


def prepare_run_folder(config: PipelineConfig, plans: Plans, folder: RunFolder,
                       spec: RunSpec, restart: bool, restart_if_changed: bool = False) -> None:
    """Guard a resume against changed settings (or forget the old run: always with RESTART,
    when its settings differ with RESTART_IF_CHANGED, as the workflow asks), then write the
    files that describe the run. Takes the folder's lock first: one trainer per folder."""
    lock_run_folder(folder.path)
    changed = folder.holds_run() and read_run_spec(folder).run_hash != spec.run_hash
    if restart or (changed and restart_if_changed):  # new weights and a new MLflow run
        folder.discard_training()
    elif changed:
        raise MedpipeError(
            "this run folder holds a run with different settings; resume it with the "
            "same config, or pass --restart to train from scratch", folder.path
        )
    folder.path.mkdir(parents=True, exist_ok=True)
    write_run_spec(spec, folder)
    write_json(plans.model_dump(mode="json"), folder.plans_file)  # inference prepares scans
    write_json(config.model_dump(mode="json"), folder.config_file)


@dataclass
class RunSetup:
    """A described run, ready to fit: what each task's `*_setup` returns."""

    folder: RunFolder
    spec: RunSpec
    plans: Plans
    network: nn.Module
    task: TrainingTask
    device: torch.device
    processes: Processes = ONE_PROCESS

    @property
    def training(self) -> TrainingConfig:
        return self.spec.training


def trainer_for(setup: RunSetup, callbacks: list | None = None) -> Trainer:
    """The engine for SETUP: its optimiser, schedule and settings from the training config."""
    training = setup.training
    optimizer = build_optimizer(setup.network, training.optimizer)
    scheduler = build_scheduler(
        optimizer, training.optimizer, training.epochs * training.iterations_per_epoch
    )
    settings = EngineSettings(
        epochs=training.epochs, iterations_per_epoch=training.iterations_per_epoch,
        val_every=training.val_every, seed=training.seed, amp=training.amp,
        amp_dtype=training.amp_dtype,
        grad_clip=training.grad_clip, device=setup.device,
    )
    return Trainer(setup.network, setup.task, optimizer, scheduler, settings,
                   setup.folder.checkpoints,
                   metadata={"model": setup.spec.model_dump(mode="json")},
                   callbacks=callbacks or [], processes=setup.processes)


def fit_run(config: PipelineConfig, setup: RunSetup, progress: bool = True) -> Path:
    """Train SETUP's network on its task in its run folder (resuming from `latest`), tracked;
    write the summary. With several processes only rank 0 tracks, prints and writes."""
    spec, folder, main = setup.spec, setup.folder, setup.processes.is_main
    tracker, callbacks = None, []
    if main:
        tracker = open_tracker(
            config.tracking_store, spec.dataset_name, spec.run_name, folder,
            tags={tracked.MODEL: spec.model, tracked.FOLD: str(spec.fold),
                  tracked.TASK: spec.task, tracked.SEED: str(spec.training.seed),
                  tracked.RECIPE: config.recipe},
        )
        callbacks.append(TrackingCallback(tracker, folder, spec, setup.plans.configuration(
            spec.configuration), git_commit()))
        if progress:
            callbacks.append(ProgressPrinter(f"{spec.model} fold {spec.fold}"))
        lock_run_folder(folder.path)
    try:
        trainer = trainer_for(setup, callbacks)
        trainer.resume()
        try:
            trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            if tracker:
                tracker.finish("KILLED")
            raise
        except BaseException as error:
            if tracker:  # the report lists it as not finished, saying why
                reason = getattr(error, "reason", None) or str(error) or type(error).__name__
                tracker.set_tags({tracked.FAILURE: reason.splitlines()[0][:500]})
                tracker.finish("FAILED")
            raise
        if main:
            write_json(trainer.summary(), folder.training_summary)
    finally:
        if main:
            unlock_run_folder(folder.path)
        stop(setup.processes)
    return folder.path
