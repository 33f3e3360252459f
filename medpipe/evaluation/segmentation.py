"""`evaluate-seg`: predict a fold's validation cases, map them back to the raw grid and
score them against the raw reference labels (Dice, HD95 in mm, volumes).

Predictions are made from the preprocessed arrays (the exact input the network saw in
validation), then resampled to the raw grid the way nnU-Net exports them (probabilities,
then argmax). The scores therefore include everything a user would see: resampling back,
cropping, and the raw label's own geometry.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from medpipe import tracked
from medpipe.config import PipelineConfig
from medpipe.data.layout import load_dataset
from medpipe.device import autocast_dtype, pick_device
from medpipe.errors import MedpipeError
from medpipe.io import atomic_output, read_image, write_image, write_json
from medpipe.metrics import segmentation_metrics, summarise
from medpipe.models.sliding_window import predict_probabilities
from medpipe.preprocessing import load_preprocessed, restore_label_from_probabilities
from medpipe.progress import report_step
from medpipe.runs.folder import RunFolder
from medpipe.runs.loading import load_trained
from medpipe.runs.spec import SegmentationRunSpec

CASES_TABLE, SUMMARY = "cases.csv", "summary.json"  # in `evaluation/` or `evaluation_test/`
METRICS = ("dice", "hd95", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")
TRACKED_CLASS_METRICS = ("dice", "hd95", "volume_diff_ml")


def evaluate_segmentation(
    config: PipelineConfig,
    model: str,
    fold: int,
    run_dir: Path | None = None,
    checkpoint: str = "best",
    mirror: bool = False,
    device: str = "auto",
    cases: Literal["validation", "test"] = "validation",
) -> dict[str, Any]:
    """Score the fold's validation cases (CASES validation: `evaluation/`) or, for repeated
    runs to pair on the same cases, the labelled test cases (test: `evaluation_test/`,
    predictions in `test/`; the workflow preprocesses them): cases.csv and summary.json in
    the run folder, logged (with the summary's means) to the run's MLflow run. Returns the
    summary."""
    folder = RunFolder(run_dir) if run_dir else config.run_folder(model, fold)
    torch_device = pick_device(device)
    network, spec = load_trained(folder, checkpoint, torch_device)
    if not isinstance(spec, SegmentationRunSpec) or spec.model != model or spec.fold != fold:
        raise MedpipeError(
            f"run folder holds {spec.task} model {spec.model} fold {spec.fold}, not "
            f"segmentation model {model} fold {fold}", folder.path)
    scheme = spec.label_scheme
    classes = scheme.scored_classes
    dataset = load_dataset(config.dataset)
    case_ids, predictions, scored = spec.val_cases, folder.validation, folder.evaluation
    if cases == "test":
        case_ids, predictions, scored = (dataset.labelled_test_ids, folder.test_predictions,
                                         folder.test_evaluation)
        if not case_ids:
            raise MedpipeError("no labelled test cases (imagesTs with labelsTs) to score",
                               config.dataset)
    rows, seconds = [], []
    started = time.perf_counter()
    for index, case_id in enumerate(case_ids, start=1):
        case = load_preprocessed(config.preprocessed_dir, case_id)
        start = time.perf_counter()
        probabilities = predict_probabilities(
            network, case.data, spec.patch_size, torch_device,
            mirror_axes=(0, 1, 2) if mirror else (),
            dtype=autocast_dtype(torch_device, True), sigmoid=scheme.regions,
            classes=spec.out_channels,
        )
        predicted = restore_label_from_probabilities(probabilities.numpy(), case.properties,
                                                     scheme)
        seconds.append(time.perf_counter() - start)
        write_image(predicted, predictions / f"{case_id}{dataset.spec.file_ending}")
        reference = read_image(dataset.case(case_id).label)
        scores = segmentation_metrics(
            predicted.array, reference.array, classes, reference.spacing
        )
        for name, values in scores.items():
            rows.append({"case_id": case_id, "class": name, **values,
                         "seconds": seconds[-1]})
        report_step(f"{spec.run_name}: case", index, len(case_ids), started)
    summary = _summary(rows, classes, seconds, spec, checkpoint, mirror, torch_device,
                       case_ids, cases)
    write_cases_table(rows, scored / CASES_TABLE)
    write_json(summary, scored / SUMMARY)
    _log(config, folder, spec, summary, scored, cases)
    return summary


def _summary(rows, classes, seconds, spec: SegmentationRunSpec, checkpoint, mirror,
             device, case_ids: Sequence[str], cases: str) -> dict[str, Any]:
    return {
        "model": spec.model,
        "fold": spec.fold,
        "seed": spec.training.seed,
        "scored": cases,
        "checkpoint": checkpoint,
        "mirroring": mirror,
        "device": str(device),
        **summarise_cases(rows, classes, case_ids),
        "seconds_per_case": summarise(seconds),
    }


def summarise_cases(rows: list[dict], classes: Mapping[str, Any],
                    case_ids: Sequence[str]) -> dict[str, Any]:
    """Per class each metric's mean/std over cases, and the mean over classes of each case's
    Dice and of the classes' HD95: what every segmentation summary holds."""
    per_class = {
        name: {metric: summarise([r[metric] for r in rows if r["class"] == name])
               for metric in METRICS}
        for name in classes
    }
    case_means = [summarise([r["dice"] for r in rows if r["case_id"] == case_id])["mean"]
                  for case_id in case_ids]
    return {
        "cases": len(case_ids),
        "classes": per_class,
        "mean_dice": summarise(case_means),
        "mean_hd95": summarise([per_class[n]["hd95"]["mean"] for n in classes]),
    }


def write_cases_table(rows: list[dict], path: Path) -> None:
    """cases.csv: one row per case and class (with the seconds per case when measured)."""
    timed = ["seconds"] if rows and "seconds" in rows[0] else []
    with atomic_output(path) as staging, staging.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "class", *METRICS, *timed])
        writer.writeheader()
        writer.writerows(rows)


def _log(config: PipelineConfig, folder: RunFolder, spec: SegmentationRunSpec,
         summary: dict, scored: Path, cases: str) -> None:
    """The scores to the run's MLflow run: validation's means per class (`evaluation/`), or
    the run's own test-set mean beside them (`evaluation_test/`)."""
    from medpipe.tracking import open_tracker

    tracker = open_tracker(config.tracking_store, spec.dataset_name, spec.run_name, folder)
    if cases == "test":
        metrics = {tracked.TEST_MEAN_DICE: summary["mean_dice"]["mean"]}
        artifacts = tracked.TEST_EVALUATION_FOLDER
    else:
        metrics = {tracked.EVAL_MEAN_DICE: summary["mean_dice"]["mean"],
                   tracked.EVAL_MEAN_HD95: summary["mean_hd95"]["mean"],
                   tracked.EVAL_SECONDS_PER_CASE: summary["seconds_per_case"]["mean"]}
        for name, values in summary["classes"].items():
            for metric in TRACKED_CLASS_METRICS:
                metrics[tracked.eval_class_metric(metric, name)] = values[metric]["mean"]
        artifacts = tracked.EVALUATION_FOLDER
    tracker.log_metrics(metrics)
    tracker.log_artifact(scored / CASES_TABLE, artifacts)
    tracker.log_artifact(scored / SUMMARY, artifacts)
    tracker.finish("FINISHED")
