"""Run folders, shared by every task: what a run is, how it resumes, and the one function
that wires a task and a network into the engine with tracking and progress.

A run folder (`results/runs/<model>/fold_<k>/`) holds everything needed to use the model
later without the pipeline: `model.json` (how to build the net and prepare its input),
`plans.json`, `config.json`, `checkpoints/{latest,best}.{pt,json}`, `figures/`, and
`training.json`, written last, which marks the run complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.config import PipelineConfig, TrainingConfig, optimizer_config
from medpipe.data.splits import fold_cases, read_splits
from medpipe.errors import MedpipeError
from medpipe.io import Geometry, orientation, write_json
from medpipe.tracking import RUN_FILE, git_commit, open_tracker
from medpipe.training.callbacks import ProgressPrinter, TrackingCallback
from medpipe.training.engine import EngineSettings, Trainer, TrainingTask
from medpipe.training.optim import build_optimizer, build_scheduler

TRAINING_SUMMARY = "training.json"  # written last: the run is complete when it exists


def load_plans(config: PipelineConfig) -> tuple[dict, dict]:
    """(plans, the chosen configuration's block), with errors that say which step to run."""
    if not config.plans_file.is_file():
        raise MedpipeError("no plans: run `medpipe plan` (or the workflow) first",
                           config.plans_file)
    plans = json.loads(config.plans_file.read_text(encoding="utf-8"))
    try:
        return plans, plans["configurations"][config.configuration]
    except KeyError:
        raise MedpipeError(f"plans have no configuration {config.configuration!r}",
                           config.plans_file) from None


def fold_case_ids(config: PipelineConfig, fold: int) -> tuple[list[str], list[str]]:
    if not config.splits_file.is_file():
        raise MedpipeError("no splits: run `medpipe split` (or the workflow) first",
                           config.splits_file)
    splits = read_splits(config.splits_file)
    if not 0 <= fold < len(splits):
        raise MedpipeError(f"fold {fold} does not exist; splits have folds 0-{len(splits) - 1}",
                           config.splits_file)
    split = fold_cases(splits, fold)
    return list(split["train"]), list(split["val"])


def training_orientation(config: PipelineConfig, case_ids: list[str]) -> str | None:
    """The orientation (axis codes, e.g. "LPS") shared by the training scans, which
    inference turns every new scan into; None when they differ (nothing is reoriented)."""
    codes = set()
    for case_id in case_ids:
        properties = config.preprocessed_dir / f"{case_id}.json"
        if properties.is_file():
            geometry = json.loads(properties.read_text(encoding="utf-8"))["geometry"]
            codes.add(orientation(Geometry.from_json(geometry)))
    return codes.pop() if len(codes) == 1 else None


def base_description(config: PipelineConfig, model: str, fold: int, task: str,
                     options: dict, training: TrainingConfig) -> dict[str, Any]:
    """What every run description holds; each task adds its own network and data fields."""
    plans, _ = load_plans(config)
    train_ids, val_ids = fold_case_ids(config, fold)
    return {
        "task": task,
        "model": model,
        "options": options,
        "configuration": config.configuration,
        "labels": plans["labels"],
        "channel_names": plans["channel_names"],
        "in_channels": len(plans["channel_names"]),
        "dataset_name": plans.get("dataset_name", "dataset"),
        "data_hash": plans.get("data_hash"),
        "fold": fold,
        "orientation": training_orientation(config, train_ids),
        "train_cases": train_ids,
        "val_cases": val_ids,
        "training": training.model_dump(mode="json"),
    }


def run_hash(description: dict[str, Any]) -> str:
    """Hash of what defines the run; settings that do not change the result are left out."""
    stable = {k: v for k, v in description.items() if k not in ("training", "run_hash")}
    stable["training"] = {k: v for k, v in description["training"].items()
                          if k not in ("num_workers", "device", "val_every")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def class_names(labels: dict[str, int]) -> dict[int, str]:
    return {int(v): k for k, v in labels.items() if int(v) != 0}


def prepare_run_dir(config: PipelineConfig, run_dir: Path, description: dict,
                    restart: bool) -> None:
    """Guard a resume against changed settings (or wipe the old run with RESTART), then
    write the files that describe the run."""
    description["run_hash"] = run_hash(description)
    model_file = run_dir / "model.json"
    if restart:  # a fresh run: new weights, and a new MLflow run rather than the old one
        (run_dir / TRAINING_SUMMARY).unlink(missing_ok=True)
        (run_dir / RUN_FILE).unlink(missing_ok=True)
        for name in ("latest", "best"):
            for suffix in (".pt", ".json"):
                (run_dir / "checkpoints" / f"{name}{suffix}").unlink(missing_ok=True)
    elif model_file.is_file():
        previous = json.loads(model_file.read_text(encoding="utf-8"))
        if previous.get("run_hash") != description["run_hash"]:
            raise MedpipeError(
                "this run folder holds a run with different settings; resume it with the "
                "same config, or pass --restart to train from scratch", run_dir
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(description, model_file)
    plans, _ = load_plans(config)
    write_json(plans, run_dir / "plans.json")  # inference prepares scans with these
    write_json(config.model_dump(mode="json"), run_dir / "config.json")


@dataclass
class RunSetup:
    """A described run, ready to fit: what each task's `*_setup` returns."""

    run_dir: Path
    description: dict[str, Any]
    network: nn.Module
    task: TrainingTask
    training: TrainingConfig
    device: torch.device


def trainer_for(setup: RunSetup, callbacks: list | None = None) -> Trainer:
    """The engine for SETUP: its optimiser, schedule and settings from the training config."""
    training = setup.training
    optimizer = build_optimizer(setup.network, optimizer_config(training))
    scheduler = build_scheduler(
        optimizer, optimizer_config(training), training.epochs * training.iterations_per_epoch
    )
    settings = EngineSettings(
        epochs=training.epochs, iterations_per_epoch=training.iterations_per_epoch,
        val_every=training.val_every, seed=training.seed, amp=training.amp,
        grad_clip=training.grad_clip, device=setup.device,
    )
    return Trainer(setup.network, setup.task, optimizer, scheduler, settings,
                   setup.run_dir / "checkpoints", metadata={"model": setup.description},
                   callbacks=callbacks or [])


def fit_run(config: PipelineConfig, setup: RunSetup, progress: bool = True) -> Path:
    """Train SETUP's network on its task in its run folder (resuming from `latest`), tracked;
    write the summary."""
    run_dir, description = setup.run_dir, setup.description
    model, fold = description["model"], description["fold"]
    tracker = open_tracker(
        config.tracking, description["dataset_name"], f"{model}_fold_{fold}", run_dir,
        tags={"model": model, "fold": str(fold), "task": description["task"]},
    )
    callbacks = [TrackingCallback(tracker, run_dir, config, description, git_commit(),
                                  class_names=class_names(description["labels"]))]
    if progress:
        callbacks.append(ProgressPrinter(f"{model} fold {fold}"))
    trainer = trainer_for(setup, callbacks)
    trainer.resume()
    try:
        trainer.fit()
    except BaseException:
        tracker.finish("KILLED")
        raise
    write_json(trainer.summary(), run_dir / TRAINING_SUMMARY)
    return run_dir
