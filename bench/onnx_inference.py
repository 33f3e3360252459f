"""Segmentation inference by onnxruntime against torch: seconds per scan and label agreement.

Each trained model of --runs (MODEL/fold_0) is exported by `medpipe export` and run on the
demo's test brains through the same `Segmenter` (preprocessing, sliding windows and the way
back are medpipe's for every backend; only the network's forward passes differ) three ways:
onnxruntime (fp32, CPU), torch fp32, and torch as `predict` runs it by default (bf16 autocast
where the CPU has native bf16, else fp32). The three run back to back on each scan, in turn,
so machine load drifts alike for all; each call is timed once after a warm-up prediction.
Agreement: per-class Dice of the onnxruntime labels against each torch backend's, over the
whole scan (the minimum over scans and classes is the headline).
Writes bench/results/onnx_inference.json.

    python bench/onnx_inference.py --runs demo/results/runs [--models nnunet unet] [--scans 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import WORK, write_results


def dice_per_class(a, b, classes) -> list[float]:
    out = []
    for k in classes:
        total = (a == k).sum() + (b == k).sum()
        out.append(1.0 if total == 0 else float(2 * ((a == k) & (b == k)).sum() / total))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("demo/raw"))
    parser.add_argument("--models", nargs="+", default=["nnunet", "unet", "swin_unetr"])
    parser.add_argument("--scans", type=int, default=6, help="test brains (imagesTs)")
    args = parser.parse_args()

    import torch

    from medpipe import load_segmenter
    from medpipe.inference.onnx_backend import export_onnx

    scans = sorted((args.dataset / "imagesTs").glob("*_0000.nii.gz"))[: args.scans]
    rows, table = [], []
    for model in args.models:
        run = args.runs / model / "fold_0"
        if not run.is_dir():
            print(f"skipped {model}: no {run}")
            continue
        onnx_file = WORK / "onnx" / f"{model}.onnx"
        start = time.perf_counter()
        export_onnx(run, onnx_file)
        export_seconds = time.perf_counter() - start
        backends = {
            "onnxruntime": load_segmenter(onnx_file, backend="onnxruntime"),
            "torch_fp32": load_segmenter(run, device="cpu", amp=False),
            "torch_default": load_segmenter(run, device="cpu"),
        }
        classes = [v for v in backends["torch_fp32"].labels.values() if v != 0]
        for segmenter in backends.values():  # warm-up: one-off kernel and pool set-up
            segmenter.predict(str(scans[0]))
        seconds = {name: [] for name in backends}
        dice = {"torch_fp32": [], "torch_default": []}
        for scan in scans:
            labels = {}
            for name, segmenter in backends.items():
                start = time.perf_counter()
                labels[name] = segmenter.predict(str(scan)).array
                seconds[name].append(time.perf_counter() - start)
            for name in dice:
                dice[name].append(dice_per_class(labels["onnxruntime"], labels[name], classes))
        row = {
            "model": model, "scans": len(scans), "export_seconds": export_seconds,
            "onnx_mb": onnx_file.stat().st_size / 2**20,
            "torch_default_dtype": str(backends["torch_default"].dtype),
            "torch_threads": torch.get_num_threads(),
            **{f"{name}_seconds": statistics.mean(v) for name, v in seconds.items()},
            **{f"{name}_seconds_each": v for name, v in seconds.items()},
            "min_dice_vs_torch_fp32": min(min(d) for d in dice["torch_fp32"]),
            "min_dice_vs_torch_default": min(min(d) for d in dice["torch_default"]),
            "dice_vs_torch_default": dice["torch_default"],
        }
        print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
        rows.append(row)
        table.append([model, row["onnxruntime_seconds"], row["torch_fp32_seconds"],
                      row["torch_default_seconds"], row["torch_default_dtype"],
                      row["torch_fp32_seconds"] / row["onnxruntime_seconds"],
                      row["min_dice_vs_torch_fp32"], row["min_dice_vs_torch_default"]])
    write_results("onnx_inference", {"dataset": str(args.dataset), "rows": rows},
                  ["model", "onnxruntime s/scan", "torch fp32 s/scan", "torch default s/scan",
                   "torch default dtype", "torch fp32 / onnxruntime", "min Dice vs fp32",
                   "min Dice vs default"], table,
                  notes="Whole-scan `predict` (read, preprocess, sliding windows, back to the "
                        "scan's grid) on the demo's test brains, the backends in turn on each "
                        "scan; Dice of onnxruntime's labels against each torch backend's, the "
                        "minimum over scans and classes.")


if __name__ == "__main__":
    main()
