"""Training throughput: patches (pairs) per second and peak memory per model, medpipe's
engine against a plain loop written the way MONAI's tutorials write one.

Same network (built by medpipe from the demo's plans, same initial weights), same
preprocessed cases, same batch size and patch size (each model's planned one, fitted to what
it divides by), same device. medpipe: `Trainer.train_epoch` on the task `train-seg` /
`train-reg` builds (nnU-Net's patch sampler with foreground oversampling, deep supervision,
gradient clipping, AMP on a GPU). Reference: a `monai.data.Dataset` + `RandCropByPosNegLabeld`
(pos 1, neg 2: nnU-Net's one third foreground) after `SpatialPadd` to the patch
+ `DataLoader(shuffle=True)` +
`list_data_collate`, then zero_grad / forward / `DiceCELoss` / backward / step, as in MONAI's
3D segmentation tutorials; for registration, the same pairs fed to a bare loop with the same
loss. Augmentation is off in both (its cost is measured by `data_loading.py`). Memory:
what each measurement added to the process's resident memory at its peak (network,
optimiser state, activations, data). Writes bench/results/training_throughput.json.

    python bench/training_throughput.py [--quick] [--models unet nnunet swin_unetr voxelmorph]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from common import demo_pipeline, gpu_peak_mb, measured, write_results

SEGMENTATION = ("unet", "nnunet", "swin_unetr")
REGISTRATION = ("voxelmorph", "voxelmorph_diff")


def _config(root: Path, model: str, iterations: int, device: str):
    from medpipe.config import load_config

    return load_config(root / "config.yaml", [
        "training.patch_size=null", "training.num_workers=0", f"training.device={device}",
        f"training.iterations_per_epoch={iterations}", "training.epochs=2",
        f"models.{model}.training.patch_size=null",
        f"models.{model}.training.iterations_per_epoch={iterations}",
        f"models.{model}.training.epochs=2", f"models.{model}.training.batch_size=null",
    ])


def _setup(root: Path, model: str, iterations: int, device: str, run_dir: Path):
    from medpipe.training.registration import registration_setup
    from medpipe.training.segmentation import segmentation_setup

    config = _config(root, model, iterations, device)
    setup = registration_setup if model in REGISTRATION else segmentation_setup
    return setup(config, model, 0, run_dir, restart=True)


def measure_engine(root: str, model: str, iterations: int, device: str) -> dict:
    """medpipe's engine: one warm-up epoch, then one timed epoch of ITERATIONS steps."""
    from medpipe.training.runs import trainer_for

    with tempfile.TemporaryDirectory() as folder:
        setup = _setup(Path(root), model, iterations, device, Path(folder) / "run")
        trainer = trainer_for(setup)
        trainer.train_epoch()
        metrics = trainer.train_epoch()
        unit = setup.task.unit
        return {"per_s": metrics[f"{unit}_per_s"], "unit": unit,
                "batch_size": setup.description["batch_size"],
                "patch_size": setup.description.get("patch_size")
                or setup.description.get("grid_shape"),
                "gpu_peak_mb": gpu_peak_mb(setup.device)}


def measure_reference(root: str, model: str, iterations: int, device: str) -> dict:
    """The plain loop on the same network and data: ITERATIONS warm-up steps, ITERATIONS
    timed."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        setup = _setup(Path(root), model, iterations, device, Path(folder) / "run")
        network = setup.network.to(setup.device)
        if model in REGISTRATION:
            batches, step = _registration_reference(setup)
        else:
            batches, step = _segmentation_reference(setup)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        network.train()
        samples, start = 0, 0.0
        for index, batch in enumerate(itertools.islice(batches, 2 * iterations)):
            if index == iterations:
                samples, start = 0, time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, count = step(network, batch)
            loss.backward()
            optimizer.step()
            samples += count
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        return {"per_s": samples / (time.perf_counter() - start),
                "gpu_peak_mb": gpu_peak_mb(setup.device)}


def _forever(loader):
    while True:
        yield from loader


def _segmentation_reference(setup):
    import torch
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    description, device = setup.description, setup.device
    cases = setup.task.dataset.cases
    data = [{"image": c.data, "label": c.seg[None]} for c in cases]
    patch = description["patch_size"]
    crop = RandCropByPosNegLabeld(["image", "label"], "label", patch, pos=1, neg=2,
                                  num_samples=1)
    crop.set_random_state(0)
    transform = Compose([SpatialPadd(["image", "label"], patch), crop])
    loader = DataLoader(Dataset(data, transform), batch_size=description["batch_size"],
                        shuffle=True, num_workers=0, collate_fn=list_data_collate)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

    def step(network, batch):
        image, label = batch["image"].to(device), batch["label"].to(device)
        output = network(image)
        if output.dim() == image.dim() + 1:  # DynUNet deep supervision, as MONAI's tutorial
            heads = torch.unbind(output, 1)
            loss = sum(0.5**i * loss_function(h, label) for i, h in enumerate(heads))
        else:
            loss = loss_function(output, label)
        return loss, len(image)

    return _forever(loader), step


def _registration_reference(setup):
    from torch.utils.data import DataLoader

    task, device = setup.task, setup.device
    loader = DataLoader(task.dataset, batch_size=task.dataset.batch_size, num_workers=0)

    def step(network, batch):
        fixed, moving = batch["fixed"].to(device), batch["moving"].to(device)
        warped, ddf = network(moving, fixed)
        return task.loss_function(warped, fixed, ddf, batch["moving_labels"].to(device),
                                  batch["fixed_labels"].to(device)), len(fixed)

    return _forever(loader), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (minutes, not hours)")
    parser.add_argument("--models", nargs="+", default=[*SEGMENTATION, "voxelmorph"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    root = demo_pipeline()
    rows, table = [], []
    for model in args.models:
        iterations = (2 if model == "swin_unetr" else 3) if args.quick else 20
        engine = measured(measure_engine, str(root), model, iterations, args.device)
        reference = measured(measure_reference, str(root), model, iterations, args.device)
        ratio = engine["per_s"] / reference["per_s"]
        rows.append({"model": model, "iterations": iterations, "engine": engine,
                     "reference": reference, "engine_over_reference": ratio})
        table.append([model, "x".join(map(str, engine["patch_size"])), engine["batch_size"],
                      engine["per_s"], reference["per_s"], ratio, engine["added_memory_mb"],
                      reference["added_memory_mb"]])
        print(rows[-1], flush=True)
    write_results(
        "training_throughput", {"quick": args.quick, "rows": rows},
        ["model", "patch", "batch", "medpipe /s", "reference /s", "ratio", "medpipe MB",
         "reference MB"], table,
        notes="Units: patches (pairs for voxelmorph) per second, timed after a warm-up; MB: "
              "resident memory the measurement added at its peak (data, network, optimiser, "
              "activations).")


if __name__ == "__main__":
    main()
