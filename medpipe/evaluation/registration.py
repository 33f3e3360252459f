"""`evaluate-reg`: every method on the same held-out pairs, scored the same way.

A method turns a (moving, fixed) pair of preprocessed cases into an ITK displacement field
on the fixed case's *raw* grid (see `registration.fields`): identity (no registration
beyond the centres of mass matched, a translation), the classical SimpleITK baseline, ANTs
SyN (`registration.ants_baseline`), a trained network (pre-alignment + predicted field,
composed in `compose_field`), or NETWORK_io: that network with its field refined per pair
(`registration.instance_optimisation`), its own method with its own run folder and time.
The moving raw label map is then warped through that field, every method's the same way
(each label's mask linearly interpolated, then the most likely label: `fields.warp_labels`),
and compared with the fixed raw labels: Dice and HD95 (mm) per label; the field gives
folding (% of voxels with det J <= 0) and SDlogJ. Where both directions of a pair are
scored, inverse consistency: |phi_BA(phi_AB(x)) - x| in mm over the fixed brain (labels
> 0), mean and 95th percentile. Seconds per pair count everything from the two
preprocessed images to the field.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medpipe import tracked
from medpipe.config import ANTS_STANDARD, AntsSettings, PipelineConfig, RegistrationConfig
from medpipe.data.layout import load_dataset
from medpipe.data.splits import fold_case_ids
from medpipe.device import pick_device
from medpipe.errors import MedpipeError
from medpipe.figures import plot_registration
from medpipe.io import Volume, atomic_output, from_sitk, read_image, write_json
from medpipe.metrics import deformation_metrics, segmentation_metrics, summarise
from medpipe.planning.plans import Plans, read_plans
from medpipe.progress import report_step
from medpipe.registration.ants_baseline import AntsRegistration
from medpipe.registration.classical import displacement_field, register_classical
from medpipe.registration.fields import field_to_ddf, identity_field, warp_with_field
from medpipe.registration.network import NetworkRegistration, network_spacing
from medpipe.registration.pairs import (
    RegistrationCase,
    evaluation_pairs,
    load_registration_cases,
    moments_matrix,
)
from medpipe.runs.folder import RunFolder
from medpipe.runs.loading import load_trained
from medpipe.runs.spec import RegistrationRunSpec

BASELINES = ("identity", "classical", "ants", "ants_standard")
REFINED = "_io"  # NETWORK_io: the network with instance optimisation
PAIR_METRICS = ("folding_percent", "sdlogj", "sdlogj_learn2reg", "jacobian_min",
                "jacobian_mean", "inverse_consistency_mm", "inverse_consistency_p95_mm",
                "seconds")

# (moving case, fixed case, fixed raw Volume) -> ITK field on the fixed raw grid
Method = Callable[[RegistrationCase, RegistrationCase, Volume], sitk.Image]


def evaluate_registration(
    config: PipelineConfig,
    method: str,
    fold: int,
    run_dir: Path | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    network_dir: Path | None = None,
    amp: bool = True,
) -> dict[str, Any]:
    """Score METHOD (a baseline: identity, classical, ants; a trained network's name; or
    NETWORK_io) on the held-out pairs (`held_out_cases`); write `evaluation/pairs.csv`,
    `evaluation/summary.json` and a figure in the run folder and log them to its MLflow run.
    NETWORK_io reads the network from NETWORK_DIR (default: NETWORK's run folder) and writes
    to its own. A network runs its layers under mixed precision where the device computes
    it natively (AMP; its geometry stays float32), in float32 without. Returns the
    summary."""
    folder = RunFolder(run_dir) if run_dir else config.run_folder(method, fold)
    plans = read_plans(config.plans_file)
    val_ids = held_out_cases(config, fold)
    torch_device = pick_device(device)
    if method in BASELINES:
        network_folder = None
    elif (network := refined_network(method)) is not None:
        network_folder = RunFolder(network_dir) if network_dir else config.run_folder(
            network, fold)
    else:
        network_folder = folder
    with ExitStack() as resources:
        return _evaluate(config, method, fold, folder, network_folder, plans, val_ids,
                         torch_device, checkpoint, resources, amp)


def held_out_cases(config: PipelineConfig, fold: int) -> list[str]:
    """The cases whose pairs score every method: FOLD's validation cases, or (with
    `registration.eval_cases: test`) the labelled test cases, which no fold trained on."""
    if config.registration.eval_cases == "validation":
        return fold_case_ids(config.splits_file, fold)[1]
    labelled = load_dataset(config.dataset).labelled_test_ids
    if len(labelled) < 2:
        raise MedpipeError("registration.eval_cases is test, but the dataset has "
                           f"{len(labelled)} labelled test case(s) (imagesTs with labelsTs); "
                           "pairs need 2", config.dataset)
    return labelled


def refined_network(method: str) -> str | None:
    """The network NETWORK_io refines, or None for any other method."""
    return method[: -len(REFINED)] if method.endswith(REFINED) else None


def _evaluate(config: PipelineConfig, method: str, fold: int, folder: RunFolder,
              network_folder: RunFolder | None, plans: Plans, val_ids: list[str],
              torch_device, checkpoint: str, resources: ExitStack,
              amp: bool) -> dict[str, Any]:
    settings = config.registration
    precision = None  # the network's layers' autocast dtype; a baseline has none
    if network_folder is None:
        register = _baseline(method, settings, resources)
        atlas, spec = settings.atlas, None
    else:
        network, spec = load_trained(network_folder, checkpoint, torch_device)
        if not isinstance(spec, RegistrationRunSpec) or spec.fold != fold:
            raise MedpipeError(f"run folder does not hold a registration network for fold "
                               f"{fold}", network_folder.path)
        atlas = spec.registration.atlas
        refinement = settings.instance_optimisation if refined_network(method) else None
        if refinement is not None and refinement.steps == 0:
            raise MedpipeError(f"{method} needs registration.instance_optimisation.steps > 0")
        network_method = NetworkRegistration(network, spec, torch_device,
                                             network_spacing(spec, plans), refinement, amp)
        dtype = network_method.dtype
        precision = str(dtype).removeprefix("torch.") if dtype is not None else "float32"

        def register(moving, fixed, target):
            return network_method(moving, fixed, target.geometry, target.shape)
    pairs = evaluation_pairs(val_ids, atlas, settings.eval_pairs)
    if not pairs:
        raise MedpipeError(f"fold {fold} has no held-out pairs to evaluate", config.splits_file)
    ids = sorted({case_id for pair in pairs for case_id in pair})
    cases = {c.case_id: c for c in load_registration_cases(config.preprocessed_dir, ids)}
    dataset = load_dataset(config.dataset)
    classes = plans.label_scheme.scored_classes  # a region: the union of its labels
    rows, per_pair = [], []
    fields: dict[tuple[str, str], tuple[sitk.Image, np.ndarray]] = {}  # kept for the reverse
    scored = set(pairs)
    out = folder.evaluation
    started = time.perf_counter()
    for index, (moving_id, fixed_id) in enumerate(pairs):
        fixed_image = read_image(dataset.case(fixed_id).images[0])
        start = time.perf_counter()
        field = register(cases[moving_id], cases[fixed_id], fixed_image)
        seconds = time.perf_counter() - start
        moving_labels = read_image(dataset.case(moving_id).label)
        fixed_labels = read_image(dataset.case(fixed_id).label)
        warped_labels = warp_with_field(moving_labels, field, labels=True)
        scores = segmentation_metrics(warped_labels.array, fixed_labels.array, classes,
                                      fixed_labels.spacing)
        # Learn2Reg's HD95 is in voxels of its grids: the same metrics at unit spacing
        in_voxels = segmentation_metrics(warped_labels.array, fixed_labels.array, classes,
                                         (1.0, 1.0, 1.0))
        for name in classes:
            scores[name]["hd95_voxels"] = in_voxels[name]["hd95"]
        ddf = field_to_ddf(field)
        pair_scores = {**deformation_metrics(ddf), "seconds": seconds,
                       "inverse_consistency_mm": math.nan,
                       "inverse_consistency_p95_mm": math.nan}
        if (fixed_id, moving_id) in scored:
            fields[(moving_id, fixed_id)] = (field, fixed_labels.array > 0)
        per_pair.append({"moving": moving_id, "fixed": fixed_id, **pair_scores,
                         "mean_dice": float(np.nanmean([s["dice"] for s in scores.values()]))})
        for name, values in scores.items():
            rows.append({"moving": moving_id, "fixed": fixed_id, "class": name,
                         "dice": values["dice"], "hd95": values["hd95"],
                         "hd95_voxels": values["hd95_voxels"], **pair_scores})
        report_step(f"{method} fold {fold}: pair", index + 1, len(pairs), started)
        if index == 0:
            moving_image = read_image(dataset.case(moving_id).images[0])
            warped = warp_with_field(moving_image, field)
            plot_registration(
                fixed_image.array, _on_grid(moving_image, fixed_image), warped.array, ddf,
                out / f"{method}_{moving_id}_to_{fixed_id}.png",
                title=f"{method}: {moving_id} -> {fixed_id}",
            )
    _add_inverse_consistency(fields, per_pair, rows)
    summary = _summary(method, fold, classes, rows, per_pair, torch_device, checkpoint
                       if spec else None, precision)
    _write_csv(rows, folder.pairs_table)
    write_json(summary, folder.evaluation_summary)
    _log(config, folder, method, fold, plans, summary, trained=network_folder == folder)
    return summary


# --------------------------------------------------------------------------- methods


def ants_settings(method: str, settings: RegistrationConfig) -> AntsSettings:
    """What baseline METHOD (ants or ants_standard) runs: `ants_standard` is the configured
    ANTs settings with ANTs' standard preset as the transform."""
    if method == "ants_standard":
        return settings.ants.model_copy(update={"transform": ANTS_STANDARD})
    return settings.ants


def _baseline(method: str, settings: RegistrationConfig, resources: ExitStack) -> Method:
    """A baseline as a Method; one that holds a process (ANTs' worker) is closed with
    RESOURCES."""
    if method == "identity":  # the floor: centres of mass matched (where networks, ANTs start)
        def centres_matched(moving: RegistrationCase, fixed: RegistrationCase, target: Volume):
            shift = sitk.TranslationTransform(3, moments_matrix(moving, fixed)[:3, 3].tolist())
            return displacement_field(shift, target)

        return centres_matched
    if method in ("ants", "ants_standard"):
        register = resources.enter_context(AntsRegistration(ants_settings(method, settings)))
    else:
        def register(fixed: Volume, moving: Volume) -> sitk.Transform:
            return register_classical(fixed, moving, settings.classical)

    def baseline(moving: RegistrationCase, fixed: RegistrationCase, target: Volume):
        return displacement_field(register(fixed.volume(), moving.volume()), target)

    return baseline


def inverse_consistency(forward: sitk.Image, backward: sitk.Image,
                        mask: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile (mm) of |phi_BA(phi_AB(x)) - x| at the fixed voxels in MASK.

    FORWARD is A -> B's field on B's (the fixed) grid, taking fixed points into A; BACKWARD
    is B -> A's on A's grid. phi_BA is read at phi_AB(x) by resampling BACKWARD through
    FORWARD (linear); where phi_AB(x) leaves A's grid the backward displacement counts as 0.
    """
    transform = sitk.DisplacementFieldTransform(sitk.Image(forward))
    backward_there = sitk.Resample(backward, forward, transform, sitk.sitkLinear, 0.0,
                                   forward.GetPixelID())
    error = from_sitk(forward).array + from_sitk(backward_there).array
    distance = np.linalg.norm(error, axis=-1)[mask]
    if distance.size == 0:
        return math.nan, math.nan
    return float(distance.mean()), float(np.percentile(distance, 95))


def _add_inverse_consistency(fields: dict, per_pair: list[dict], rows: list[dict]) -> None:
    """Fill the inverse-consistency scores of every pair whose reverse was scored too."""
    for pair in per_pair:
        key, reverse = (pair["moving"], pair["fixed"]), (pair["fixed"], pair["moving"])
        if key not in fields or reverse not in fields:
            continue
        forward, mask = fields[key]
        mean, p95 = inverse_consistency(forward, fields[reverse][0], mask)
        pair.update(inverse_consistency_mm=mean, inverse_consistency_p95_mm=p95)
        for row in rows:
            if (row["moving"], row["fixed"]) == key:
                row.update(inverse_consistency_mm=mean, inverse_consistency_p95_mm=p95)


def _on_grid(moving: Volume, fixed: Volume) -> np.ndarray:
    """The moving image where it lies physically on the fixed grid (for the figure)."""
    return warp_with_field(moving, identity_field(fixed.geometry, fixed.shape)).array


# --------------------------------------------------------------------------- outputs


def _summary(method, fold, classes, rows, per_pair, device, checkpoint,
             precision) -> dict[str, Any]:
    return {
        "method": method,
        "fold": fold,
        "checkpoint": checkpoint,
        "device": str(device),
        "precision": precision,
        "pairs": len(per_pair),
        "classes": {name: {metric: summarise([r[metric] for r in rows if r["class"] == name])
                           for metric in ("dice", "hd95", "hd95_voxels")}
                    for name in classes},
        "mean_dice": summarise([p["mean_dice"] for p in per_pair]),
        # Learn2Reg's "DSC30": the 30th percentile over pairs of the pair's mean Dice
        "dice30": float(np.nanpercentile([p["mean_dice"] for p in per_pair], 30)),
        "mean_hd95_voxels": summarise([r["hd95_voxels"] for r in rows]),
        "mean_hd95": summarise([r["hd95"] for r in rows]),
        **{metric: summarise([p[metric] for p in per_pair]) for metric in PAIR_METRICS},
    }


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_output(path) as staging, staging.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["moving", "fixed", "class", "dice", "hd95",
                                               "hd95_voxels",
                                               *PAIR_METRICS])
        writer.writeheader()
        writer.writerows(rows)


def _method_params(config: PipelineConfig, method: str) -> dict[str, Any]:
    """The settings of a method whose run starts at its evaluation."""
    settings = config.registration
    if (network := refined_network(method)) is not None:
        section, values = "instance_optimisation", settings.instance_optimisation
        extra = {"network": network}
    else:
        section, values = (("ants", ants_settings(method, settings))
                           if method.startswith("ants") else ("classical", settings.classical))
        extra = {}
    return {**extra, **{f"{section}.{k}": v for k, v in values.model_dump(mode="json").items()}}


def _log(config: PipelineConfig, folder: RunFolder, method: str, fold: int, plans: Plans,
         summary: dict, trained: bool) -> None:
    from medpipe.tracking import git_commit, open_tracker

    tracker = open_tracker(
        config.tracking_store, plans.dataset_name, f"{method}_fold_{fold}", folder,
        tags={tracked.MODEL: method, tracked.FOLD: str(fold), tracked.TASK: "registration"},
    )
    # set on every evaluation: a network's run was opened by its training (whose tags stay)
    tracker.set_tags({tracked.EVAL_CASES: config.registration.eval_cases})
    if not trained and not tracker.resumed:  # a baseline or NETWORK_io: its run starts here
        tracker.log_params({"method": method, "fold": fold, **_method_params(config, method)})
        tracker.set_tags({tracked.GIT_COMMIT: git_commit(), tracked.DEVICE: summary["device"]})
    metrics = {tracked.EVAL_MEAN_DICE: summary["mean_dice"]["mean"],
               tracked.EVAL_MEAN_HD95: summary["mean_hd95"]["mean"],
               tracked.EVAL_DICE30: summary["dice30"],
               tracked.EVAL_MEAN_HD95_VOXELS: summary["mean_hd95_voxels"]["mean"]}
    for metric in PAIR_METRICS:
        name = (tracked.EVAL_SECONDS_PER_PAIR if metric == "seconds"
                else tracked.eval_metric(metric))
        metrics[name] = summary[metric]["mean"]
    for name, values in summary["classes"].items():
        for metric in ("dice", "hd95", "hd95_voxels"):
            metrics[tracked.eval_class_metric(metric, name)] = values[metric]["mean"]
    tracker.log_metrics(metrics)
    for path in sorted(folder.evaluation.iterdir()):
        tracker.log_artifact(path, tracked.EVALUATION_FOLDER)
    tracker.finish("FINISHED")
