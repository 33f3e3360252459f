"""Training throughput: patches (pairs) per second and peak memory per model, medpipe's
engine against a plain loop written the way MONAI's tutorials write one.

Same network (built by medpipe from the demo's plans, same initial weights), same
preprocessed cases, same batch size and patch size (each model's planned one, fitted to what
it divides by), same device. medpipe: `Trainer.train_epoch` on the task `train-seg` /
`train-reg` builds (nnU-Net's patch sampler with foreground oversampling, deep supervision,
gradient clipping, AMP on a GPU). Reference: a `monai.data.Dataset` + `RandCropByPosNegLabeld`
(pos 1, neg 2: nnU-Net's one third foreground) after `SpatialPadd` to the patch
+ `DataLoader(shuffle=True)` + `list_data_collate`, then zero_grad / forward / `DiceCELoss` /
backward / step, as in MONAI's 3D segmentation tutorials; for registration, the same pairs
fed to a bare loop with the same loss. Augmentation is off in both (its cost is measured by
`data_loading.py`). Steps alternate between the two (see `measure_model`). Memory: what
medpipe's first step added to the process's resident memory at its peak (network, optimiser
state, activations, data). Writes bench/results/training_throughput.json.

    python bench/training_throughput.py [--quick] [--models unet nnunet swin_unetr voxelmorph]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import (
    SMOKE,
    PeakMemory,
    demo_pipeline,
    gpu_peak_mb,
    in_fresh_process,
    write_results,
)

SEGMENTATION = ("unet", "nnunet", "swin_unetr")
REGISTRATION = ("voxelmorph", "voxelmorph_diff")


def _config(root: Path, model: str, device: str):
    """The demo's settings at the planned patch and batch, one step per epoch (a long
    schedule, so the learning rate stays valid however many are run)."""
    from medpipe.config import load_config

    return load_config(root / "config.yaml", [
        f"{scope}.{key}" for scope in ("training", f"models.{model}.training")
        for key in ("patch_size=null", "num_workers=0", f"device={device}",
                    "iterations_per_epoch=1", "epochs=1000", "batch_size=null")])


def _setup(root: Path, model: str, device: str, run_dir: Path):
    from medpipe.training.registration import registration_setup
    from medpipe.training.segmentation import segmentation_setup

    config = _config(root, model, device)
    setup = registration_setup if model in REGISTRATION else segmentation_setup
    return setup(config, model, 0, run_dir, restart=True)


def measure_model(root: str, model: str, rounds: int, device: str) -> dict:
    """MODEL's engine and reference loop in this (fresh) process, on two copies of the same
    network (same initial weights) and the same cases: one warm-up step each, then ROUNDS
    rounds of one engine step and one reference step (in turn first), each timed; per side
    the median step.

    Alternating puts both sides under the same machine load: on a shared CPU the speed
    drifts by a quarter over minutes, more than the difference being measured. Memory: the
    engine's warm-up step, the first thing in the process; the reference's runs after it and
    reuses memory the engine freed, so it is not recorded."""
    import statistics

    import torch

    from medpipe.training.runs import trainer_for

    with tempfile.TemporaryDirectory() as folder:
        setup = _setup(Path(root), model, device, Path(folder) / "engine")
        trainer = trainer_for(setup)  # one epoch = one step: the engine's full per-step cost
        other = _setup(Path(root), model, device, Path(folder) / "reference")
        other.network.load_state_dict(setup.network.state_dict())
        network = other.network.to(other.device)
        batches, loss_of = (_registration_reference if model in REGISTRATION
                            else _segmentation_reference)(other)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        network.train()

        def reference_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = loss_of(network, next(batches))
            loss.backward()
            optimizer.step()

        def timed(step) -> float:
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        with PeakMemory() as memory:
            trainer.train_epoch()
        gpu_mb = gpu_peak_mb(setup.device)
        reference_step()
        steps = {"engine": [], "reference": []}
        sides = [("engine", trainer.train_epoch), ("reference", reference_step)]
        for index in range(rounds):  # ABBA: neither side always goes first
            for side, step in sides if index % 2 == 0 else sides[::-1]:
                steps[side].append(timed(step))
        batch = setup.spec.batch_size
        per_s = {side: batch / statistics.median(times) for side, times in steps.items()}
        return {"engine_per_s": per_s["engine"], "reference_per_s": per_s["reference"],
                "step_seconds": steps, "unit": setup.task.unit, "batch_size": batch,
                "patch_size": getattr(setup.spec, "patch_size", None)
                or getattr(setup.spec, "grid_shape", None),
                "engine_added_memory_mb": round(memory.added_mb, 1),
                "engine_peak_rss_mb": round(memory.peak_mb, 1), "engine_gpu_peak_mb": gpu_mb}


def _forever(loader):
    while True:
        yield from loader


def _segmentation_reference(setup):
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    spec, device = setup.spec, setup.device
    cases = setup.task.dataset.cases
    data = [{"image": c.data, "label": c.seg[None]} for c in cases]
    patch = spec.patch_size
    crop = RandCropByPosNegLabeld(["image", "label"], "label", patch, pos=1, neg=2,
                                  num_samples=1)
    crop.set_random_state(0)
    transform = Compose([SpatialPadd(["image", "label"], patch), crop])
    loader = DataLoader(Dataset(data, transform), batch_size=spec.batch_size,
                        shuffle=True, num_workers=0, collate_fn=list_data_collate)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    deep_loss = DeepSupervisionLoss(loss_function)  # MONAI's: weights 0.5^k, labels resized

    def loss_of(network, batch):
        image, label = batch["image"].to(device), batch["label"].to(device)
        output = network(image)
        if isinstance(output, list):  # deep supervision, each output at its own size
            loss = deep_loss(output, label.float())
        else:
            loss = loss_function(output, label)
        return loss, len(image)

    return _forever(loader), loss_of


def _registration_reference(setup):
    from torch.utils.data import DataLoader

    task, device = setup.task, setup.device
    loader = DataLoader(task.dataset, batch_size=task.dataset.batch_size, num_workers=0)

    def loss_of(network, batch):
        fixed, moving = batch["fixed"].to(device), batch["moving"].to(device)
        warped, ddf = network(moving, fixed)
        return task.loss_function(warped, fixed, ddf, batch["moving_labels"].to(device),
                                  batch["fixed_labels"].to(device)), len(fixed)

    return _forever(loader), loss_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (minutes, not hours)")
    parser.add_argument("--models", nargs="+", default=[*SEGMENTATION, "voxelmorph"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    root = demo_pipeline()
    rows, table = [], []
    for model in args.models:
        rounds = 1 if SMOKE else (1 if model == "swin_unetr" else 3) if args.quick else 30
        result = in_fresh_process(measure_model, str(root), model, rounds, args.device)
        ratio = result["engine_per_s"] / result["reference_per_s"]
        rows.append({"model": model, "rounds": rounds, **result,
                     "engine_over_reference": ratio})
        table.append([model, "x".join(map(str, result["patch_size"])), result["batch_size"],
                      result["engine_per_s"], result["reference_per_s"], ratio,
                      result["engine_added_memory_mb"]])
        print(rows[-1], flush=True)
    write_results(
        "training_throughput", {"quick": args.quick, "rows": rows},
        ["model", "patch", "batch", "medpipe /s", "reference /s", "ratio", "medpipe MB"],
        table,
        notes="Units: patches (pairs for voxelmorph) per second: batch size / median step, "
              "engine and reference steps alternating in one process after a warm-up step "
              "each; MB: resident memory medpipe's first training step added (data, network, "
              "optimiser, activations).")


if __name__ == "__main__":
    main()
