"""The prepared GPU check: every model trained for a fixed number of steps on the device,
one case predicted with sliding windows, one pair registered, in one command sized for a
lent GPU machine (at most 8 minutes there; `--budget-seconds` stops starting new models).

Run it in two places:

    make gpu-check-data                      # here: the data, preprocessed, and the wheels
    python bench/gpu_check.py [--device cuda] [--iterations 20] [--out FILE]   # there

On the lent GPU machine, as one call of the device tool (carry: bench/work/gpu_check),
`bench/gpu_check.sh` installs the wheels that fit its Python into a temporary folder and
runs this script with the arguments given:

    bench/gpu_check.sh --out $OUT/gpu.json
    bench/gpu_check.sh --device cpu --iterations 2     # the same, here, on the CPU

`--prepare` builds the demo's brains at 3 mm (6 cases, planned and preprocessed: 17 MiB, the
raw scans left behind) into bench/work/gpu_check/data and downloads the wheels of
bench/gpu_wheels.txt (what the GPU machine lacks: MONAI, pydantic, nibabel, batchgenerators;
about 8 MiB, not SimpleITK's 50 MiB nor MLflow: training from preprocessed data with tracking
off needs neither) into bench/work/gpu_check/wheels. Both travel with the code (`make
gpu-check-data`; the device tool's `carry`).

Per model (each model's planned patch and batch, its default widths, nnU-Net's augmentation
on, loader workers chosen from the CPU count, bf16 autocast; nnunet once more in fp16 with a
gradient scaler): one epoch of ITERATIONS steps to warm up (cuDNN's search, the loader's
workers), then one timed: seconds per step, samples per second, the share of the epoch the
loop waited for data (`data_wait_seconds`: the device idle for want of a batch), peak GPU
memory (torch's allocation), GPU utilisation (NVML, sampled every 50 ms), skipped steps.
Then the network predicts one held-out case with sliding windows (segmentation) or
registers one held-out pair (registration), timed after one warm-up call. nnU-Net's own
trainer is not run: nnunetv2 needs SimpleITK, whose wheel alone is 50 MiB, more than the 20
MiB of wheels the check may carry.

Results go to bench/results/gpu.json (or --out) after every model, so a run cut short keeps
what it measured; a model that fails is recorded with its error and the check goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "work" / "gpu_check"
WHEELS_FILE = HERE / "gpu_wheels.txt"
SEGMENTATION = ("unet", "nnunet", "nnunet_resenc", "swin_unetr")
REGISTRATION = ("voxelmorph", "voxelmorph_diff", "pyramid")
# (model, autocast dtype, where augmentation runs): bf16 for all, fp16 + GradScaler once,
# nnU-Net's augmentation on the GPU (`training.augment_on: device`) once
RUNS = [*((m, "bf16", "loader") for m in (*SEGMENTATION, *REGISTRATION)),
        ("nnunet", "fp16", "loader"), ("nnunet", "bf16", "device")]


def parse_run(text: str) -> tuple[str, str, str]:
    """MODEL[:DTYPE[:AUGMENT_ON]] -> (model, dtype, augment_on); bf16 and loader by default."""
    parts = text.split(":")
    return (*parts, *("bf16", "loader")[len(parts) - 1:])[:3]


def prepare(python_versions: list[str]) -> None:
    """The data and the wheels (for each of PYTHON_VERSIONS and this Python: one folder
    serves the GPU machine and a check here; `gpu_check.sh` installs what fits), into
    FOLDER."""
    sys.path.insert(0, str(HERE))
    from common import demo_pipeline, resenc_plans

    root = demo_pipeline(cases=6, name="gpu_check_data")
    data = FOLDER / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    (data / "raw").mkdir()  # dataset.json alone: training reads the preprocessed cases
    shutil.copy(root / "raw" / "dataset.json", data / "raw" / "dataset.json")
    (data / "results").mkdir()
    for name in ("plans.json", "splits.json"):
        shutil.copy(root / "results" / name, data / "results" / name)
    shutil.copytree(root / "results" / "preprocessed", data / "results" / "preprocessed")
    resenc_plans(data / "results", root / "raw")  # nnunet_resenc's, over the same cases
    wheels = FOLDER / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    requirements = [line.split("#")[0].strip() for line in WHEELS_FILE.read_text().splitlines()]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    for version in sorted({*python_versions, here}):
        subprocess.run([
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--python-version", version, "--implementation", "cp",
            *(arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                              "manylinux2014_x86_64") for arg in ("--platform", tag)),
            "-d", str(wheels), *filter(None, requirements)], check=True)
    size = sum(f.stat().st_size for f in wheels.iterdir()) / 2**20
    print(f"data: {data} ({folder_mib(data):.1f} MiB); wheels: {wheels} ({size:.1f} MiB)")


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


class Utilisation:
    """GPU utilisation (%) sampled by NVML every 50 ms while the block runs; None without
    NVML or a GPU."""

    def __init__(self, device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        import torch

        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # no NVML (nvidia-ml-py) here
                return self
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import torch

        while not self._stop.wait(0.05):
            self.samples.append(float(torch.cuda.utilization(self.device)))

    def __exit__(self, *_) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def config_for(data: Path, model: str, dtype: str, augment_on: str, device: str,
               iterations: int, workers: int | None, folder: Path):
    """The check's config: the prepared data, tracking off, two epochs of ITERATIONS steps,
    the model's planned patch and batch and default options, augmentation on."""
    import yaml

    from medpipe.config import load_config

    results = data / "results"  # with nnunet_resenc's ResEnc M plans beside plans.json
    config = {
        "dataset": str(data / "raw"), "results": str(results),
        "configuration": "3d_fullres", "folds": 5, "tracking": {"enabled": False},
        "training": {"epochs": 2, "iterations_per_epoch": iterations, "val_every": 1000,
                     "augment": True, "augment_on": augment_on, "device": device,
                     "amp": True, "amp_dtype": dtype, "num_workers": workers},
    }
    path = folder / f"{model}_{dtype}_{augment_on}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_config(path)


def check_model(data: Path, model: str, dtype: str, augment_on: str, device: str,
                iterations: int, workers: int | None) -> dict:
    import numpy as np
    import torch

    from medpipe import tracked
    from medpipe.device import autocast
    from medpipe.training.registration import registration_setup
    from medpipe.training.runs import trainer_for
    from medpipe.training.segmentation import segmentation_setup

    registration = model in REGISTRATION
    with tempfile.TemporaryDirectory() as folder:
        config = config_for(data, model, dtype, augment_on, device, iterations, workers,
                            Path(folder))
        setup_of = registration_setup if registration else segmentation_setup
        setup = setup_of(config, model, 0, Path(folder) / "run", restart=True)
        trainer = trainer_for(setup)
        on_gpu = setup.device.type == "cuda"
        warm = trainer.train_epoch()
        trainer.epoch += 1
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(setup.device)
        with Utilisation(setup.device) as utilisation:
            metrics = trainer.train_epoch()
            if on_gpu:
                torch.cuda.synchronize()
        seconds = metrics[tracked.EPOCH_SECONDS]
        row = {
            "model": model, "task": "registration" if registration else "segmentation",
            "amp_dtype": str(trainer.dtype).replace("torch.", "") if trainer.dtype else None,
            "augment_on": augment_on if not registration else None,
            "batch_size": setup.spec.batch_size,
            "patch": list(getattr(setup.spec, "patch_size", None) or setup.spec.grid_shape),
            "loader_workers": setup.task.num_workers,
            "iterations": iterations,
            "seconds_per_iteration": seconds / iterations,
            "samples_per_second": metrics[tracked.EPOCH_SAMPLES] / seconds,
            "data_wait_share": metrics[tracked.DATA_WAIT_SECONDS] / seconds,
            "warm_up_seconds": warm[tracked.EPOCH_SECONDS],
            "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(setup.device) / 2**20
                                   if on_gpu else None),
            "gpu_utilisation_percent": utilisation.mean,
            "skipped_steps": warm[tracked.SKIPPED_STEPS] + metrics[tracked.SKIPPED_STEPS],
            "train_loss": metrics[tracked.TRAIN_LOSS],
        }
        network = trainer.model.eval()
        if registration:
            arrays = setup.task.validation[0].arrays
            moving, fixed = (torch.from_numpy(arrays[k])[None].to(setup.device)
                             for k in ("moving", "fixed"))

            def infer() -> None:
                with torch.no_grad(), autocast(setup.device, trainer.dtype):
                    network(moving, fixed)
            row["inference"] = "one pair, forward passes"
            row["inference_shape"] = list(moving.shape[2:])
        else:
            from medpipe.models.sliding_window import predict_probabilities

            case = setup.task.validation_cases[0]

            def infer() -> None:
                predict_probabilities(network, np.asarray(case.data), setup.spec.patch_size,
                                      setup.device, dtype=trainer.dtype)
            row["inference"] = "one case, sliding windows (overlap 0.5)"
            row["inference_shape"] = list(np.asarray(case.data).shape[1:])
        infer()
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        infer()
        if on_gpu:
            torch.cuda.synchronize()
        row["inference_seconds"] = time.perf_counter() - start
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="build the data and wheels")
    parser.add_argument("--python-version", nargs="+", default=["3.12"],
                        help="of the wheels (--prepare; this Python's are added)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=20, help="timed steps per model")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes; default: chosen from the CPU count")
    parser.add_argument("--models", nargs="+", default=None, help="a subset, MODEL or "
                        "MODEL:DTYPE")
    parser.add_argument("--data", type=Path, default=FOLDER / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    parser.add_argument("--budget-seconds", type=float, default=420,
                        help="start no model after this many seconds")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.python_version)
        return
    started = time.perf_counter()
    import torch

    sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench's `common`, the checkout's medpipe
    from common import machine

    runs = RUNS
    if args.models:
        runs = [parse_run(m) for m in args.models]
    device = torch.device(args.device)
    result = {"benchmark": "gpu_check", "machine": machine(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cpu_count": os.cpu_count(), "iterations": args.iterations,
              "nnunet_own_trainer": "not run: nnunetv2 needs SimpleITK (a 50 MiB wheel), more "
                                    "than the check's 20 MiB of wheels", "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model, dtype, augment_on in runs:
        if time.perf_counter() - started > args.budget_seconds:
            result["rows"].append({"model": model, "amp_dtype": dtype, "augment_on": augment_on,
                                   "skipped": "the check's time budget was spent"})
            continue
        print(f"== {model} ({dtype}, augmentation on the {augment_on})", flush=True)
        try:
            row = check_model(args.data, model, dtype, augment_on, args.device,
                              args.iterations, args.workers)
        except Exception as error:  # recorded; the other models still run
            traceback.print_exc()
            row = {"model": model, "amp_dtype": dtype, "augment_on": augment_on,
                   "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        result["seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    failed = [r["model"] for r in result["rows"] if "error" in r]
    print(f"gpu check: {len(result['rows'])} runs in {result['seconds']:.0f} s, "
          f"{len(failed)} failed {failed or ''} -> {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
