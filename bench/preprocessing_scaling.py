"""Preprocessing scaling: seconds to preprocess N cases (crop, normalise, resample, class
locations, written as .npz + .json) with 1, 2, ... worker processes, so the time for a
larger dataset or a bigger machine can be read off. The demo brains at 3 mm, the demo's
plans. Writes bench/results/preprocessing_scaling.json.

    python bench/preprocessing_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import SMOKE, demo_pipeline, write_results


def seconds_for(root: Path, n_cases: int, workers: int) -> float:
    from medpipe.data import load_dataset
    from medpipe.planning.plans import read_plans
    from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset

    dataset = load_dataset(root / "raw")
    plans = read_plans(root / "results" / "plans.json")
    classes = sorted(v for v in dataset.spec.label_values if v > 0)
    cases = list(dataset.training)[:n_cases]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        preprocess_dataset(cases, PreprocessingPlan.from_plans(plans), out, classes, workers)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    root = demo_pipeline(cases=6 if args.quick else 12, name=None if args.quick else "demo_12")
    sizes = [2] if SMOKE else [3, 6] if args.quick else [3, 6, 12]
    worker_counts = sorted({1, cores})
    rows, table = [], []
    for n_cases in sizes:
        base = None
        for workers in worker_counts:
            seconds = seconds_for(root, n_cases, workers)
            base = base or seconds
            rows.append({"cases": n_cases, "workers": workers, "seconds": seconds,
                         "seconds_per_case": seconds / n_cases, "speed_up": base / seconds})
            table.append([n_cases, workers, seconds, seconds / n_cases, base / seconds])
            print(rows[-1], flush=True)
    write_results("preprocessing_scaling", {"quick": args.quick, "rows": rows},
                  ["cases", "workers", "seconds", "s / case", "speed-up"], table,
                  notes="Demo brains at 3 mm (66x78x63), the demo's plans (3 mm target).")


if __name__ == "__main__":
    main()
