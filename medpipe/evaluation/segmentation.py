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
from pathlib import Path
from typing import Any

from medpipe.config import PipelineConfig
from medpipe.data.layout import load_dataset
from medpipe.errors import MedpipeError
from medpipe.inference.model_io import load_trained
from medpipe.inference.sliding_window import predict_probabilities
from medpipe.io import atomic_output, read_image, write_image, write_json
from medpipe.metrics import segmentation_metrics, summarise
from medpipe.preprocessing import load_preprocessed, restore_probabilities
from medpipe.training.engine import autocast_dtype, pick_device

METRICS = ("dice", "hd95", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")


def evaluate_segmentation(
    config: PipelineConfig,
    model: str,
    fold: int,
    run_dir: Path | None = None,
    checkpoint: str = "best",
    mirror: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Write `evaluation/cases.csv` and `evaluation/summary.json` in the run folder; log both
    (and the summary's means) to the run's MLflow run. Returns the summary."""
    run_dir = Path(run_dir or config.run_dir(model, fold))
    torch_device = pick_device(device)
    network, description = load_trained(run_dir, checkpoint, torch_device)
    if description["model"] != model or description["fold"] != fold:
        raise MedpipeError(
            f"run folder holds {description['model']} fold {description['fold']}, "
            f"not {model} fold {fold}", run_dir)
    classes = {name: int(v) for name, v in description["labels"].items() if int(v) != 0}
    dataset = load_dataset(config.dataset)
    predictions = run_dir / "validation"
    rows, seconds = [], []
    for case_id in description["val_cases"]:
        data, _, properties = load_preprocessed(config.preprocessed_dir, case_id)
        start = time.perf_counter()
        probabilities = predict_probabilities(
            network, data, description["patch_size"], torch_device,
            mirror_axes=(0, 1, 2) if mirror else (),
            dtype=autocast_dtype(torch_device, True),
        )
        predicted = restore_probabilities(probabilities.numpy(), properties)
        seconds.append(time.perf_counter() - start)
        write_image(predicted, predictions / f"{case_id}{dataset.spec.file_ending}")
        reference = read_image(dataset.case(case_id).label)
        scores = segmentation_metrics(
            predicted.array, reference.array, classes, reference.spacing
        )
        for name, values in scores.items():
            rows.append({"case_id": case_id, "class": name, **values,
                         "seconds": seconds[-1]})
    summary = _summary(rows, classes, seconds, description, checkpoint, mirror, torch_device)
    out = run_dir / "evaluation"
    _write_csv(rows, out / "cases.csv")
    write_json(summary, out / "summary.json")
    _log(config, run_dir, description, summary, out)
    return summary


def _summary(rows, classes, seconds, description, checkpoint, mirror, device) -> dict[str, Any]:
    per_class = {
        name: {metric: summarise([r[metric] for r in rows if r["class"] == name])
               for metric in METRICS}
        for name in classes
    }
    case_means = []
    for case_id in description["val_cases"]:
        dices = [r["dice"] for r in rows if r["case_id"] == case_id]
        case_means.append(summarise(dices)["mean"])
    return {
        "model": description["model"],
        "fold": description["fold"],
        "checkpoint": checkpoint,
        "mirroring": mirror,
        "device": str(device),
        "cases": len(description["val_cases"]),
        "classes": per_class,
        "mean_dice": summarise(case_means),
        "mean_hd95": summarise([per_class[n]["hd95"]["mean"] for n in classes]),
        "seconds_per_case": summarise(seconds),
    }


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_output(path) as staging, staging.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "class", *METRICS, "seconds"])
        writer.writeheader()
        writer.writerows(rows)


def _log(config: PipelineConfig, run_dir: Path, description: dict, summary: dict,
         out: Path) -> None:
    from medpipe.tracking import open_tracker

    tracker = open_tracker(config.tracking, description["dataset_name"],
                           f"{description['model']}_fold_{description['fold']}", run_dir)
    metrics = {"eval_mean_dice": summary["mean_dice"]["mean"],
               "eval_mean_hd95": summary["mean_hd95"]["mean"],
               "eval_seconds_per_case": summary["seconds_per_case"]["mean"]}
    for name, values in summary["classes"].items():
        for metric in ("dice", "hd95", "volume_diff_ml"):
            metrics[f"eval_{metric}_{name}"] = values[metric]["mean"]
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "cases.csv", "evaluation")
    tracker.log_artifact(out / "summary.json", "evaluation")
    tracker.finish("FINISHED")
