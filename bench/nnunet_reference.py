"""nnU-Net v2's own predictor on scans, for `inference_speed.py` to set beside ours.

Runs with the Python of an environment that has nnU-Net v2 (`make test` builds
`.venv-nnunet`; its dependencies pin another torch than medpipe's), never medpipe's, and
prints a JSON list, one object per (scan, mirroring) row. The model folder is made the way
nnU-Net users get one: nnU-Net's own fingerprint and planner on the dataset
(`nnUNetv2_extract_fingerprint`, `nnUNetv2_plan_experiment`), then the network its trainer
would build from those plans, randomly initialised (weights do not change the cost of a
prediction), saved as its trainer saves `checkpoint_final.pth`. Timed: reading the file
with nnU-Net's `SimpleITKIO` and `nnUNetPredictor.predict_single_npy_array` (preprocess,
sliding windows with Gaussian weighting and half-patch overlap, optional mirroring over all
three axes, resampling back to the input grid, argmax): what medpipe's `predict(path)` does.

    .venv-nnunet/bin/python bench/nnunet_reference.py --dataset RAW --work DIR \
        --rows '[["scan.nii.gz", false], ...]' [--patch-size X,Y,Z] [--features 32,...] \
        [--repeats N]

`--patch-size` and `--features` replace the plans' patch size and features per stage (as
nnU-Net users edit plans.json), to match a medpipe model of another size. The patch is given
in medpipe's (x, y, z) order; nnU-Net lists axes as SimpleITK's (z, y, x), transposed by
`transpose_forward`. That correspondence holds for scans stored in RAS voxel order, like the
demo's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from common import fastest, measured

DATASET_ID = 900
CONFIGURATION = "3d_fullres"


def use_folders(work: Path) -> None:
    """nnU-Net reads its three folders from the environment when it is imported."""
    for name in ("raw", "preprocessed", "results"):
        os.environ[f"nnUNet_{name}"] = str(work / name)


def nnunet_plans(dataset: Path, work: Path) -> Path:
    """nnU-Net's plans for DATASET, by its own fingerprint and planner (made once)."""
    name = f"Dataset{DATASET_ID:03d}_Bench"
    plans = work / "preprocessed" / name / "nnUNetPlans.json"
    if plans.is_file():
        return plans
    raw = work / "raw" / name
    shutil.rmtree(raw, ignore_errors=True)
    shutil.copytree(dataset / "imagesTr", raw / "imagesTr")
    shutil.copytree(dataset / "labelsTr", raw / "labelsTr")
    shutil.copy(dataset / "dataset.json", raw / "dataset.json")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )

    # what `nnUNetv2_extract_fingerprint -d 900 -np 2` and `nnUNetv2_plan_experiment -d 900`
    # call, in this process; their messages go to stderr (stdout carries the JSON)
    with contextlib.redirect_stdout(sys.stderr):
        extract_fingerprints([DATASET_ID], num_processes=2, show_progress_bar=False)
        plan_experiments([DATASET_ID])
    return plans


def model_folder(dataset: Path, work: Path, patch_xyz: list[int] | None,
                 features: list[int] | None) -> Path:
    """A trained-model folder as nnU-Net's trainer leaves one (plans.json, dataset.json,
    fold_0/checkpoint_final.pth), for the plans edited to PATCH_XYZ and FEATURES; made once
    per such pair under WORK/models."""
    plans = json.loads(nnunet_plans(dataset, work).read_text(encoding="utf-8"))
    settings = plans["configurations"][CONFIGURATION]
    if patch_xyz:
        zyx = list(reversed(patch_xyz))
        settings["patch_size"] = [zyx[axis] for axis in plans["transpose_forward"]]
    if features:
        settings["architecture"]["arch_kwargs"]["features_per_stage"] = features
    tag = "p{}_f{}".format("x".join(map(str, settings["patch_size"])), "-".join(
        map(str, settings["architecture"]["arch_kwargs"]["features_per_stage"])))
    folder = work / "models" / tag / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if checkpoint.is_file():
        return folder

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    network = nnUNetTrainer.build_network_architecture(
        manager, configuration,
        determine_num_input_channels(manager, configuration, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    shutil.copy(dataset / "dataset.json", folder / "dataset.json")
    partial = checkpoint.with_suffix(".partial")  # the checkpoint's presence means done
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CONFIGURATION},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, partial)
    partial.replace(checkpoint)
    return folder


def measure(folder: Path, rows: list[tuple[str, bool]], repeats: int) -> list[dict]:
    """The model loaded and warmed up once (a prediction of the first scan), then each
    (scan, mirroring) row read and predicted REPEATS times, the fastest kept; memory: what
    the row added above the loaded model. As `inference_speed.py` measures ours."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    cuda = torch.cuda.is_available()
    predictors = {}
    for mirror in sorted({m for _, m in rows}):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                    perform_everything_on_device=cuda,
                                    device=torch.device("cuda" if cuda else "cpu"),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
        predictors[mirror] = predictor

    def predict(scan: str, mirror: bool) -> None:
        image, properties = SimpleITKIO().read_images([scan])
        predictors[mirror].predict_single_npy_array(image, properties)

    predict(rows[0][0], False)
    first = predictors[rows[0][1]]
    configuration = first.configuration_manager
    facts = {"device": str(first.device),
             "parameters": sum(p.numel() for p in first.network.parameters()),
             "patch_size_zyx": list(configuration.patch_size),
             "spacing_zyx": list(configuration.spacing),
             "features_per_stage": list(
                 configuration.network_arch_init_kwargs["features_per_stage"]),
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}

    def timed(scan: str, mirror: bool) -> dict:
        return {**fastest(predict, scan, mirror, repeats=repeats), **facts}

    return [measured(timed, scan, mirror) for scan, mirror in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="nnU-Net raw dataset")
    parser.add_argument("--work", type=Path, required=True, help="nnU-Net's folders")
    parser.add_argument("--rows", required=True,
                        help='JSON list of [scan, mirroring]: [["a.nii.gz", false], ...]')
    parser.add_argument("--patch-size", help="X,Y,Z voxels, medpipe's axis order")
    parser.add_argument("--features", help="features per stage, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="timed predictions")
    args = parser.parse_args()
    use_folders(args.work.resolve())

    def numbers(text: str | None) -> list[int] | None:
        return [int(v) for v in text.split(",")] if text else None

    folder = model_folder(args.dataset.resolve(), args.work.resolve(),
                          numbers(args.patch_size), numbers(args.features))
    rows = [(str(Path(scan).resolve()), bool(mirror)) for scan, mirror in json.loads(args.rows)]
    print(json.dumps(measure(folder, rows, args.repeats)))


if __name__ == "__main__":
    main()
