"""Data loading: how many training samples per second each model's input pipeline delivers
per loader worker, and how many workers a GPU's step rate would need.

No network runs: this is the ceiling the loader puts on training. Each model's own
pipeline from its run setup (the demo's 3 mm brains): segmentation patches at the model's
patch and batch with nnU-Net's augmentation in the workers (`augment_on: loader`) or only
the parameters drawn there and the batch augmented on the device (`augment_on: device`,
timed here on this CPU as well), registration pairs padded for the device to resample.
Rates for 0 workers (in the training process) and 1 worker; with several workers a loader
scales about linearly until the cores run out, so the workers a GPU needs are its samples
per second over one worker's. Where bench/results/gpu.json holds a measured GPU step rate
for the model, that rate is used; nnU-Net's default is 12 workers.
Writes bench/results/data_loading.json.

    python bench/data_loading.py [--quick] [--models unet pyramid]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from common import RESULTS, SMOKE, demo_pipeline, resenc_plans, write_results

SEGMENTATION = ("unet", "nnunet", "nnunet_resenc", "swin_unetr")
REGISTRATION = ("voxelmorph", "pyramid")


def setup_for(root: Path, model: str, augment_on: str, folder: Path):
    from medpipe.config import load_config
    from medpipe.training.registration import registration_setup
    from medpipe.training.segmentation import segmentation_setup

    config = load_config(root / "config.yaml", ["training.augment=true",
                                                f"training.augment_on={augment_on}",
                                                "training.device=cpu"])
    if model == "nnunet_resenc":  # its own plans over the same preprocessed cases
        resenc_plans(config.results, config.dataset)
    setup_of = registration_setup if model in REGISTRATION else segmentation_setup
    return setup_of(config, model, 0, folder / f"{model}_{augment_on}", restart=True)


def samples_per_second(dataset, workers: int, batches: int) -> float:
    from medpipe.sampling import EpochLoader

    loader = EpochLoader(dataset, num_workers=workers)
    count, start = 0, 0.0
    for epoch in range(math.ceil((batches + 2) / dataset.iterations)):
        for batch in loader.epoch(epoch):
            if count == 0 and start == 0.0:  # the first batch out: workers started
                start = time.perf_counter()
                continue
            count += len(next(iter(batch.values())))
    return count / (time.perf_counter() - start)


def device_seconds(setup, batches: int) -> float:
    """Seconds per batch of the device's augmentation (here: this CPU)."""
    import torch

    from medpipe.sampling import EpochLoader

    augmenter = setup.task.dataset.augment
    loader = list(EpochLoader(setup.task.dataset).epoch(0))[:batches]
    start = time.perf_counter()
    for batch in loader:
        with torch.no_grad():
            augmenter(batch["image"], batch["label"], batch["parameters"])
    return (time.perf_counter() - start) / len(loader)


def gpu_rates() -> dict[tuple[str, str], float]:
    """(model, augment_on) -> samples/s measured on a GPU (bench/results/gpu.json), if any."""
    path = RESULTS / "gpu.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return {(r["model"], r.get("augment_on") or "loader"): r["samples_per_second"]
            for r in rows if "samples_per_second" in r and r.get("amp_dtype") == "bfloat16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=[*SEGMENTATION, *REGISTRATION])
    args = parser.parse_args()
    root = demo_pipeline()
    batches = 2 if SMOKE else 6 if args.quick else 30
    gpu = gpu_rates()
    rows, table = [], []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            places = ("loader", "device") if model in SEGMENTATION else ("loader",)
            for augment_on in places:
                setup = setup_for(root, model, augment_on, Path(folder))
                dataset = setup.task.dataset
                rates = {w: samples_per_second(dataset, w, batches) for w in (0, 1)}
                row = {"model": model, "augment_on": augment_on if model in SEGMENTATION
                       else None, "unit": setup.task.unit, "batch_size": dataset.batch_size,
                       "sample_shape": list(getattr(dataset, "patch_size", None)
                                            or dataset.shape),
                       "per_second_in_process": rates[0], "per_second_one_worker": rates[1],
                       "steps_per_second_one_worker": rates[1] / dataset.batch_size,
                       "batches": batches}
                if augment_on == "device":
                    row["device_augmentation_seconds_per_batch_here"] = device_seconds(
                        setup, min(batches, 4))
                if (model, augment_on) in gpu:
                    row["gpu_samples_per_second"] = gpu[(model, augment_on)]
                    row["workers_the_gpu_needs"] = math.ceil(gpu[(model, augment_on)]
                                                             / rates[1])
                rows.append(row)
                table.append([model, row["augment_on"] or "-", row["batch_size"],
                              "x".join(map(str, row["sample_shape"])), rates[0], rates[1],
                              row.get("workers_the_gpu_needs", "-")])
                print(row, flush=True)
    write_results("data_loading", {"quick": args.quick, "cores": len(os.sched_getaffinity(0)),
                                   "rows": rows},
                  ["model", "augmentation on", "batch", "sample", "samples / s in process",
                   "samples / s, 1 worker", "workers a GPU needs"], table,
                  notes="Each model's own pipeline on the demo's 3 mm brains (patches, or "
                        "registration pairs); 'device': the loader only cuts the patch and "
                        "draws the augmentation's parameters. Workers a GPU needs: its "
                        "measured samples/s (bench/results/gpu.json, bf16) over one worker's "
                        "rate; '-' where no GPU was measured.")


if __name__ == "__main__":
    main()
