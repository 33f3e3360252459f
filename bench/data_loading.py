"""Data loading: how many training patches per second the input pipeline delivers, with and
without nnU-Net's augmentation, for 0 (in the training process), 1, 2, ... loader workers.

No network runs: this is the ceiling the loader puts on training. Compare it with the
models' patches per second (`training_throughput.py`): where the loader is slower, a GPU
would wait for data. The demo's planned patch (80x80x64) and batch size (2), the demo's
preprocessed brains. Writes bench/results/data_loading.json.

    python bench/data_loading.py [--quick] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import demo_pipeline, write_results


def patches_per_second(root: Path, augment: bool, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    from medpipe.config import load_config
    from medpipe.planning import read_plans
    from medpipe.preprocessing import load_labelled_cases
    from medpipe.training.augment import Augmenter
    from medpipe.training.patches import PatchDataset

    config = load_config(root / "config.yaml")
    plan = read_plans(config.plans_file).configuration(config.configuration)
    case_ids = sorted(p.stem for p in config.preprocessed_dir.glob("*.npz"))
    dataset = PatchDataset(load_labelled_cases(config.preprocessed_dir, case_ids),
                           plan.patch_size, plan.batch_size,
                           iterations=batches + 2, seed=0,
                           augment=Augmenter(plan.patch_size) if augment else None)
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=workers,
                        persistent_workers=False)
    count, start = 0, 0.0
    for index, batch in enumerate(loader):
        if index == 2:  # workers started, first batches out
            count, start = 0, time.perf_counter()
        count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", nargs="+", type=int,
                        default=sorted({0, 1, cores, max(cores - 1, 1)}))
    args = parser.parse_args()
    root = demo_pipeline()
    batches = 10 if args.quick else 60
    rows, table = [], []
    for workers in args.workers:
        for augment in (False, True):
            rate = patches_per_second(root, augment, workers, batches)
            rows.append({"workers": workers, "augment": augment, "patches_per_s": rate,
                         "batches": batches})
            table.append([workers, "yes" if augment else "no", rate])
            print(rows[-1], flush=True)
    write_results("data_loading", {"quick": args.quick, "cores": cores, "rows": rows},
                  ["loader workers", "augmentation", "patches / s"], table,
                  notes="Patches of 80x80x64 voxels (the demo's planned patch), batch 2; "
                        "0 workers = loading in the training process.")


if __name__ == "__main__":
    main()
