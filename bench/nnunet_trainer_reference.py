"""nnU-Net v2's own trainer on a dataset and split, for `nnunet_training.py` to set beside
medpipe's `nnunet`.

Runs with the Python of an environment that has nnU-Net v2 (`.venv-nnunet`), never
medpipe's. What an nnU-Net user does, in one process: nnU-Net's fingerprint, planner and
preprocessing of the dataset (once, `nnunet_reference.nnunet_plans`), the split written as
`splits_final.json`, the plans edited to medpipe's patch, batch and features per stage (as
users edit plans.json), then `nnUNetTrainer` itself on the CPU with a subclass that changes
only its budget (epochs x iterations per epoch, one validation batch per epoch instead of
50: those batches only feed nnU-Net's running "pseudo Dice") and turns test-time mirroring
off for the final validation. The final validation is nnU-Net's own
(`perform_actual_validation`: sliding windows, resampling to the raw grid, written as
NIfTI). Prints one JSON object: the folder of those predictions, seconds per training
iteration per epoch (the training loop alone, from nnU-Net's `on_train_epoch_start` to
`on_train_epoch_end`: data loading, forward, loss, backward, step), the process's peak
resident memory and the settings used.

    .venv-nnunet/bin/python bench/nnunet_trainer_reference.py --dataset RAW --work DIR \
        --train a,b,c --val d,e --patch-size X,Y,Z --batch-size 2 --features 8,16,... \
        --epochs 2 --iterations 150 --seed 0

The patch is in medpipe's (x, y, z) order (see `nnunet_reference.py` for the axes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import sys
import time
from pathlib import Path

from nnunet_reference import CONFIGURATION, DATASET_ID, nnunet_plans, use_folders


def preprocessed(dataset: Path, work: Path) -> Path:
    """nnU-Net's plans for DATASET with its 3d_fullres data preprocessed (once)."""
    plans = nnunet_plans(dataset, work)
    done = plans.parent / "nnUNetPlans_3d_fullres.done"
    if not done.is_file():
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

        with contextlib.redirect_stdout(sys.stderr):
            preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(2,))
        done.touch()
    return plans


def trainer_class(epochs: int, iterations: int):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cpu = torch.device("cpu")

    class nnUNetTrainerBench(nnUNetTrainer):
        """nnU-Net's trainer with this budget; the training loop timed per epoch."""

        # nnU-Net records its __init__'s arguments by name from the signature: keep it
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = cpu) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 1
            self.epoch_seconds: list[float] = []

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None  # validation without mirroring
            return configured

        def on_train_epoch_start(self) -> None:
            super().on_train_epoch_start()
            self._epoch_started = time.perf_counter()

        def on_train_epoch_end(self, train_outputs) -> None:
            self.epoch_seconds.append(time.perf_counter() - self._epoch_started)
            super().on_train_epoch_end(train_outputs)

    return nnUNetTrainerBench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train", required=True, help="training case ids, comma-separated")
    parser.add_argument("--val", required=True, help="validation case ids, comma-separated")
    parser.add_argument("--patch-size", required=True, help="X,Y,Z, medpipe's axis order")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--features", required=True, help="features per stage")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True, help="per epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work.resolve()
    use_folders(work)

    import numpy as np
    import torch

    plans_file = preprocessed(args.dataset.resolve(), work)
    (plans_file.parent / "splits_final.json").write_text(json.dumps(
        [{"train": args.train.split(","), "val": args.val.split(",")}]), encoding="utf-8")
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    settings = plans["configurations"][CONFIGURATION]
    zyx = list(reversed([int(v) for v in args.patch_size.split(",")]))
    settings["patch_size"] = [zyx[axis] for axis in plans["transpose_forward"]]
    settings["batch_size"] = args.batch_size
    settings["architecture"]["arch_kwargs"]["features_per_stage"] = [
        int(v) for v in args.features.split(",")]
    plans["plans_name"] = f"nnUNetPlansBench_seed{args.seed}"  # its own results folder
    plans["continue_training"] = False  # what nnUNetv2_train sets without --c
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text(encoding="utf-8"))

    # nnU-Net seeds nothing itself; seeding here makes its initial weights repeatable (its
    # augmentation workers draw their own seeds)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = trainer_class(args.epochs, args.iterations)(
        plans=plans, configuration=CONFIGURATION, fold=0, dataset_json=dataset_json,
        device=torch.device("cpu"))
    with contextlib.redirect_stdout(sys.stderr):
        trainer.run_training()
        trainer.perform_actual_validation(save_probabilities=False)
    print(json.dumps({
        "predictions": str(Path(trainer.output_folder) / "validation"),
        "epoch_seconds": trainer.epoch_seconds,
        "iterations_per_epoch": args.iterations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "patch_size_zyx": settings["patch_size"], "batch_size": args.batch_size,
        "features_per_stage": settings["architecture"]["arch_kwargs"]["features_per_stage"],
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
