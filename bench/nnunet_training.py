"""medpipe's `nnunet` trained beside nnU-Net v2's own trainer: Dice, seconds per iteration
and peak memory at one budget, two seeds each.

Both sides get the same demo dataset (12 brains, 3 mm), fold 0 of medpipe's split (written
as nnU-Net's `splits_final.json`), patch, batch, features per stage, number of iterations
and one augmentation worker (nnU-Net's `nnUNet_n_proc_DA=1`, medpipe's `num_workers: 1`),
each with its own recipe otherwise: nnU-Net's SGD 0.01 with poly decay, deep supervision and
augmentation on both sides (medpipe's defaults for `nnunet`, not the demo's AdamW). Each
side plans and preprocesses with its own planner (the agreement test shows the plans equal).
Both predict the validation cases without mirroring onto the raw grid, and one function
scores both (`medpipe.evaluation.folder.evaluate_folder`, what `medpipe evaluate-folder`
runs). Runs alternate (medpipe seed 0, nnU-Net seed 0, medpipe seed 1, ...), each in a
process of its own. Seconds per iteration: each side's training loop per epoch (data
loading included, validation not), the first epoch left out (warm-up). Peak memory: the
training process's peak resident memory (augmentation workers not counted, on either side).
Writes bench/results/nnunet_training.json.

    python bench/nnunet_training.py [--quick] [--epochs 2 --iterations 150] [--seeds 0 1]
        [--name nnunet_training]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import SMOKE, WORK, demo_pipeline, write_results
from inference_speed import nnunet_python

HERE = Path(__file__).resolve().parent
PATCH = (32, 32, 32) if SMOKE else (64, 64, 48)  # the demo's patch
BATCH = 2
# the demo's quarter of nnU-Net's features (the smoke data's plans have 4 stages)
FEATURES = (8, 16, 32, 64) if SMOKE else (8, 16, 32, 64, 128)


def medpipe_run(root: Path, seed: int, epochs: int, iterations: int) -> dict:
    """medpipe's `nnunet` trained and its validation predicted, in a fresh process."""
    out = root / "runs" / f"nnunet_seed{seed}"
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from medpipe.config import load_config\n"
        "from medpipe.training.segmentation import train_segmentation\n"
        "from medpipe.evaluation.segmentation import evaluate_segmentation\n"
        "root, run, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]\n"
        "config = load_config(root / 'config.yaml', overrides)\n"
        "train_segmentation(config, 'nnunet', 0, run, restart=True, progress=False)\n"
        "evaluate_segmentation(config, 'nnunet', 0, run, checkpoint='latest')\n"
    )
    scope = "models.nnunet.training"
    overrides = [
        "tracking.enabled=false", "models.nnunet.options.deep_supervision=true",
        f"models.nnunet.options.features_per_stage={list(FEATURES)}",
        f"{scope}.epochs={epochs}", f"{scope}.iterations_per_epoch={iterations}",
        f"{scope}.val_every={epochs}", f"{scope}.patch_size={list(PATCH)}",
        f"{scope}.batch_size={BATCH}", f"{scope}.num_workers=1", f"{scope}.augment=true",
        f"{scope}.seed={seed}", f"{scope}.amp=false",
        # nnU-Net's optimiser (medpipe's default for nnunet; the demo config sets AdamW)
        f"{scope}.optimizer={{name: sgd, lr: 0.01, momentum: 0.99, nesterov: true, "
        f"weight_decay: 3.0e-05, schedule: poly}}",
    ]
    subprocess.run([sys.executable, "-c", script, str(root), str(out), *overrides],
                   check=True)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text(encoding="utf-8"))
    history = latest["history"]
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    return {"side": "medpipe nnunet", "seed": seed, "predictions": str(out / "validation"),
            "epoch_seconds": [h["epoch_seconds"] for h in history],
            "peak_rss_mb": training["peak_memory_mb"], "parameters": training["parameters"]}


def nnunet_run(python: Path, root: Path, train: list[str], val: list[str], seed: int,
               epochs: int, iterations: int) -> dict:
    command = [str(python), str(HERE / "nnunet_trainer_reference.py"),
               "--dataset", str(root / "raw"), "--work", str(WORK / "nnunet_training"),
               "--train", ",".join(train), "--val", ",".join(val),
               "--patch-size", ",".join(map(str, PATCH)), "--batch-size", str(BATCH),
               "--features", ",".join(map(str, FEATURES)), "--epochs", str(epochs),
               "--iterations", str(iterations), "--seed", str(seed)]
    env = {**os.environ, "nnUNet_n_proc_DA": "1", "PYTHONPATH": str(HERE)}
    result = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return {"side": "nnU-Net v2", "seed": seed, **json.loads(result.stdout.splitlines()[-1])}


def validation_references(root: Path, val: list[str]) -> Path:
    """A folder holding (links to) the fold's validation label maps alone: evaluate_folder
    wants a prediction for every reference it is given."""
    folder = WORK / "nnunet_training" / "references"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for case_id in val:
        label = root / "raw" / "labelsTr" / f"{case_id}.nii.gz"
        (folder / label.name).symlink_to(label)
    return folder


def scored(run: dict, root: Path, references: Path) -> dict:
    from medpipe.evaluation.folder import evaluate_folder

    summary = evaluate_folder(references, Path(run["predictions"]),
                              root / "raw", Path(run["predictions"]) / "scores")
    seconds = run["epoch_seconds"][1:] or run["epoch_seconds"]
    per_iteration = sum(seconds) / (len(seconds) * run.get("iterations_per_epoch",
                                                           run["iterations"]))
    return {**run, "summary": summary, "seconds_per_iteration": per_iteration,
            "mean_foreground_dice": summary["mean_dice"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 5 iterations, one seed")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=150, help="per epoch")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--name", default="nnunet_training",
                        help="results file name (a speed-only rerun keeps the Dice run's)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iterations, args.seeds = 2, 5, [0]
    if SMOKE:
        args.epochs, args.iterations, args.seeds = 2, 1, [0]
    python = nnunet_python(None)
    if python is None:
        sys.exit("nnU-Net v2 not found: make .venv-nnunet/.installed")
    root = demo_pipeline(cases=12)
    from medpipe.data.splits import fold_case_ids

    train, val = fold_case_ids(root / "results" / "splits.json", 0)
    references = validation_references(root, val)
    runs = []
    for seed in args.seeds:  # alternating sides
        for side in ("medpipe", "nnunet"):
            run = (medpipe_run(root, seed, args.epochs, args.iterations)
                   if side == "medpipe" else
                   nnunet_run(python, root, train, val, seed, args.epochs, args.iterations))
            run.setdefault("iterations", args.iterations)
            runs.append(scored(run, root, references))
            print(side, seed, runs[-1]["mean_foreground_dice"],
                  runs[-1]["seconds_per_iteration"], flush=True)
    table, sides = [], {}
    for run in runs:
        sides.setdefault(run["side"], []).append(run)
        table.append([run["side"], run["seed"], run["mean_foreground_dice"],
                      run["seconds_per_iteration"], run["peak_rss_mb"]])
    summary = {}
    for side, side_runs in sides.items():
        dice = [r["mean_foreground_dice"] for r in side_runs]
        summary[side] = {
            "mean_foreground_dice": statistics.mean(dice),
            "seed_spread": max(dice) - min(dice),
            "seconds_per_iteration": statistics.mean(r["seconds_per_iteration"]
                                                     for r in side_runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs)}
    if len(summary) == 2:
        ours, theirs = summary["medpipe nnunet"], summary["nnU-Net v2"]
        summary["s_per_iteration_ratio_nnunet_over_medpipe"] = (
            theirs["seconds_per_iteration"] / ours["seconds_per_iteration"])
        summary["dice_difference_medpipe_minus_nnunet"] = (
            ours["mean_foreground_dice"] - theirs["mean_foreground_dice"])
    write_results(args.name, {
        "quick": args.quick, "epochs": args.epochs, "iterations_per_epoch": args.iterations,
        "patch_size": PATCH, "batch_size": BATCH, "features_per_stage": FEATURES,
        "train_cases": train, "val_cases": val, "summary": summary, "runs": runs},
        ["side", "seed", "mean foreground Dice", "s / iteration", "peak RSS MB"], table,
        notes="Fold 0 of the 12-brain 3 mm demo dataset, both sides at the same patch, batch, "
              "features and iterations, nnU-Net's recipe (SGD poly, deep supervision, "
              "augmentation); validation without mirroring, scored by "
              "medpipe.evaluation.folder.evaluate_folder on the raw grid. s / iteration: the "
              "training loop, first epoch left out.")


if __name__ == "__main__":
    main()
