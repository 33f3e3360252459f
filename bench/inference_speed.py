"""Segmentation inference: seconds and peak memory for one whole scan, per model, with and
without mirroring, through the public API (`load_segmenter(...).predict(path)`: read,
reorient, preprocess, sliding windows, probabilities back on the input grid, argmax).

Scans: a demo brain as stored (3 mm, 66x78x63) and the same brain resampled to 256x256x256
(0.8 mm; the model still runs at its planned 3 mm, so resampling in and out is part of the
cost). Scaling: the demo brain padded to cubes of 64 ... 256 voxels at the model's own
spacing (mirrored copies of the brain filling the cube, so nothing is cropped away:
more sliding windows, no resampling). Peak memory is sampled during each measurement (model
loading included); `added_memory_mb` is what the measurement added to the process.
Writes bench/results/inference_speed.json.

    python bench/inference_speed.py [--quick] [--runs demo/results/runs]

Without --runs, each model is trained for one step on the bench's demo data first (weights
do not change the cost of a prediction).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import WORK, demo_pipeline, gpu_peak_mb, measured, one_step_runs, write_results

MODELS = ("unet", "nnunet", "swin_unetr")


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
        if not path.is_file():  # mirrored copies of the brain: no background to crop
            array = volume.array[tuple(slice(0, min(n, size)) for n in volume.shape)]
            array = np.pad(array, [(0, max(size - n, 0)) for n in array.shape],
                           mode="symmetric")
            write_image(Volume(np.ascontiguousarray(array, np.float32), volume.geometry), path)
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
    return {"seconds": seconds, "gpu_peak_mb": gpu_peak_mb(segmenter.device),
            "device": str(segmenter.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="folder of MODEL/fold_0 run folders")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    root = demo_pipeline()
    if args.runs:
        runs = args.runs
    else:
        from medpipe.training.segmentation import train_segmentation

        runs = one_step_runs(root, args.models, train_segmentation)
    sizes = [64, 128] if args.quick else [64, 96, 128, 160, 192, 256]
    files = scans(root, sizes)
    rows, table = [], []
    for model in args.models:
        run = runs / model / "fold_0"
        for name, path in files.items():
            padded = name.startswith("padded")
            for mirror in ((False,) if padded else (False, True)):
                if args.quick and model != "unet" and (mirror or padded):
                    continue  # quick: mirroring and scaling measured on one model
                result = measured(measure, str(run), str(path), mirror)
                rows.append({"model": model, "scan": name, "mirror": mirror, **result})
                table.append([model, name, "yes" if mirror else "no", result["seconds"],
                              result["added_memory_mb"]])
                print(rows[-1], flush=True)
    write_results("inference_speed", {"quick": args.quick, "runs": str(runs), "rows": rows},
                  ["model", "scan", "mirroring", "seconds", "MB"], table,
                  notes="Seconds for one `predict(path)` after a warm-up call; MB: resident "
                        "memory the measurement added at its peak (model, scan, "
                        "probabilities).")


if __name__ == "__main__":
    main()
