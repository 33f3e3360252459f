"""Segmentation inference: seconds and peak memory for one whole scan, per model, with and
without mirroring, through the public API (`load_segmenter(...).predict(path)`: read,
reorient, preprocess, sliding windows, probabilities back on the input grid, argmax).

Scans: a demo brain as stored (3 mm, 66x78x63) and the same brain resampled to 256x256x256
(0.8 mm; the model still runs at its planned 3 mm, so resampling in and out is part of the
cost). Scaling: the demo brain padded to cubes of 64 ... 160 voxels at the model's own
spacing (more sliding windows, no resampling). Each measurement runs in its own process
(peak memory includes the model and the scan). Writes bench/results/inference_speed.json.

    python bench/inference_speed.py [--quick] [--runs demo/results/runs]

Without --runs, each model is trained for one step on the bench's demo data first (weights
do not change the cost of a prediction).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import WORK, demo_pipeline, isolated, write_results

MODELS = ("unet", "nnunet", "swin_unetr")


def untrained_runs(root: Path, models: list[str]) -> Path:
    """Run folders of MODELS trained for one step (once)."""
    from medpipe.config import load_config
    from medpipe.training.segmentation import train_segmentation

    runs = root / "runs"
    for model in models:
        if (runs / model / "fold_0" / "training.json").is_file():
            continue
        config = load_config(root / "config.yaml", [
            "training.epochs=1", "training.iterations_per_epoch=1", "training.val_every=1",
            f"models.{model}.training.epochs=1",
            f"models.{model}.training.iterations_per_epoch=1",
            f"models.{model}.training.val_every=1"])
        train_segmentation(config, model, 0, runs / model / "fold_0", progress=False)
    return runs


def scans(root: Path, sizes: list[int]) -> dict[str, Path]:
    """The demo brain as stored, at 256^3, and padded to cubes of SIZES voxels (written once)."""
    import numpy as np
    import SimpleITK as sitk

    from medpipe.io import Volume, from_sitk, read_image, to_sitk, write_image

    folder = WORK / "scans"
    original = sorted((root / "raw" / "imagesTr").glob("*_0000.nii.gz"))[0]
    out = {"demo brain 66x78x63 (3 mm)": original}
    volume = read_image(original)
    big = folder / "brain_256.nii.gz"
    if not big.is_file():
        image = to_sitk(volume)
        spacing = [n * s / 256 for n, s in zip(image.GetSize(), image.GetSpacing(),
                                              strict=True)]
        resampled = sitk.Resample(image, [256] * 3, sitk.Transform(), sitk.sitkBSpline,
                                  image.GetOrigin(), spacing, image.GetDirection(), 0.0,
                                  sitk.sitkFloat32)
        write_image(from_sitk(resampled), big)
    out["same brain at 256^3 (0.8 mm)"] = big
    for size in sizes:
        path = folder / f"brain_pad_{size}.nii.gz"
        if not path.is_file():
            array = np.zeros((size,) * 3, np.float32)
            region = tuple(slice(0, min(n, size)) for n in volume.shape)
            offset = [(size - min(n, size)) // 2 for n in volume.shape]
            target = tuple(slice(o, o + r.stop) for o, r in zip(offset, region, strict=True))
            array[target] = volume.array[region]
            write_image(Volume(array, volume.geometry), path)  # same origin
        out[f"padded to {size}^3 (3 mm)"] = path
    return out


def measure(run: str, scan: str, mirror: bool) -> dict:
    """Load, then predict once to warm up and once timed (reading the file included)."""
    import torch

    from medpipe import load_segmenter

    segmenter = load_segmenter(run, device="auto")
    segmenter.predict(scan, mirror=mirror)
    if segmenter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    segmenter.predict(scan, mirror=mirror)
    seconds = time.perf_counter() - start
    gpu = (torch.cuda.max_memory_allocated() / 2**20 if segmenter.device.type == "cuda"
           else None)
    return {"seconds": seconds, "gpu_peak_mb": gpu, "device": str(segmenter.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="folder of MODEL/fold_0 run folders")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    root = demo_pipeline()
    runs = args.runs or untrained_runs(root, args.models)
    sizes = [64, 96, 128] if args.quick else [64, 96, 128, 160, 192]
    files = scans(root, sizes)
    rows, table = [], []
    for model in args.models:
        run = runs / model / "fold_0"
        for name, path in files.items():
            padded = name.startswith("padded")
            for mirror in ((False,) if padded else (False, True)):
                if args.quick and model == "swin_unetr" and (mirror or padded):
                    continue  # the slowest model: one figure per scan in quick mode
                result = isolated(measure, str(run), str(path), mirror)
                rows.append({"model": model, "scan": name, "mirror": mirror, **result})
                table.append([model, name, "yes" if mirror else "no", result["seconds"],
                              result["peak_rss_mb"]])
                print(rows[-1], flush=True)
    write_results("inference_speed", {"quick": args.quick, "runs": str(runs), "rows": rows},
                  ["model", "scan", "mirroring", "seconds", "peak MB"], table,
                  notes="Seconds for one `predict(path)` after a warm-up call; peak MB is the "
                        "process's peak resident memory (model, scan, probabilities).")


if __name__ == "__main__":
    main()
