"""Every benchmark in one command; `--quick` keeps the whole set to minutes on a 2-core CPU.

Each script writes bench/results/NAME.json + NAME.md (measurements whose memory counts run in
fresh processes of their own); this collects the tables into bench/results/summary.md, with
the seconds each script took.

    python bench/run_all.py --quick [--runs demo/results/runs]

With --runs (trained models, e.g. from `make demo`), registration Dice is that of the trained
networks and `inference_grid.py` runs too (it needs a trained segmenter).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from common import RESULTS, describe, machine

HERE = Path(__file__).resolve().parent
SCRIPTS = ["data_loading", "preprocessing_scaling", "training_throughput", "inference_speed",
           "registration_speed", "autocast_cpu", "nnunet_training", "resampling_speed"]


def run_script(name: str, arguments: list[str]) -> None:
    """bench/NAME.py's main() in this interpreter (imported as a module, so the processes it
    starts can import its functions): one start-up of torch and medpipe for all scripts."""
    argv = sys.argv
    sys.argv = [str(HERE / f"{name}.py"), *arguments]
    try:
        importlib.import_module(name).main()
    finally:
        sys.argv = argv


def prepare(only: list[str] | None) -> None:
    """The 3 mm demo data (preprocessed) and the registration pairs, built side by side before any
    measurement (once; reused from bench/work/ afterwards)."""
    from concurrent.futures import ProcessPoolExecutor

    from common import demo_pipeline, forkserver_context
    from registration_speed import PAIR_DATA

    with ProcessPoolExecutor(2, mp_context=forkserver_context()) as pool:
        jobs = [pool.submit(demo_pipeline)]
        if not only or "registration_speed" in only:
            jobs += [pool.submit(demo_pipeline, **settings) for settings in PAIR_DATA.values()]
        for job in jobs:
            job.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="trained MODEL/fold_0 run folders")
    parser.add_argument("--only", nargs="+", choices=[*SCRIPTS, "inference_grid"])
    args = parser.parse_args()
    jobs = [(name, [*(["--quick"] if args.quick else [])]) for name in SCRIPTS]
    if args.runs:
        jobs = [(n, [*a, "--runs", str(args.runs)] if n in ("inference_speed",
                                                             "registration_speed",
                                                             "resampling_speed") else a)
                for n, a in jobs]
        scans = args.runs.parent.parent / "raw" / "imagesTs"
        jobs.append(("inference_grid", ["--model", str(args.runs / "unet" / "fold_0"),
                                        "--scans", str(scans), "--spacing", "1.5,2.0,3.0",
                                        "--mirror"]))
    if args.only:
        jobs = [(n, a) for n, a in jobs if n in args.only]
    timings = {}
    total = time.perf_counter()
    prepare(args.only)
    for name, extra in jobs:
        start = time.perf_counter()
        print(f"== {name} {' '.join(extra)}", flush=True)
        run_script(name, extra)
        timings[name] = time.perf_counter() - start
    total = time.perf_counter() - total
    lines = ["# Benchmark results", "", f"Machine: {describe(machine())}",
             f"Mode: {'quick' if args.quick else 'full'}; total {total / 60:.1f} min "
             f"({', '.join(f'{n} {s:.0f} s' for n, s in timings.items())})", ""]
    for name, _ in jobs:
        path = RESULTS / f"{name}.md"
        if path.is_file():
            lines += [path.read_text(encoding="utf-8"), ""]
    (RESULTS / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS / 'summary.md'} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
