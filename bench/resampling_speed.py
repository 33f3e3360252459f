"""Where segmentation inference spends its time at 256^3, and what resampling by per-axis
matrices (`medpipe.preprocessing.resampling.resize`) saves against `scipy.ndimage.zoom`
on the volume (nnU-Net's default path), on the same weights and scan.

One `predict(path)` of our `nnunet` split into its stages (read, crop + normalise,
resampling the scan onto the plans' grid, sliding windows, the probability maps back onto
the raw grid + argmax), once with each resampling, alternating, the fastest of REPEATS
kept per stage. The labels of the two paths are compared (Dice per class); the matrices
equal zoom's answer to ~1e-15, so the labels should be identical. Scans: the demo brain as
stored (3 mm: nothing to resample) and the same brain at 256^3 (0.8 mm).
Writes bench/results/resampling_speed.json.

    python bench/resampling_speed.py [--quick] [--runs demo/results/runs] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from common import demo_pipeline, one_step_runs, write_results
from inference_speed import scans

STAGES = ("read", "crop_and_normalise", "resample_images", "sliding_windows", "restore")


def zoom_resize(array, new_shape, order, separate_axis):
    """The resampling before the matrices: scipy's zoom on the whole volume."""
    from scipy.ndimage import zoom

    if tuple(array.shape) == tuple(new_shape):
        return array.copy()
    factors = [n / o for n, o in zip(new_shape, array.shape, strict=True)]
    if separate_axis is None:
        return zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    in_plane = list(factors)
    in_plane[separate_axis] = 1.0
    resized = zoom(array, in_plane, order=order, mode="nearest", grid_mode=True)
    along = [1.0] * array.ndim
    along[separate_axis] = factors[separate_axis]
    return zoom(resized, along, order=0, mode="nearest", grid_mode=True)


@contextmanager
def stage_timer(use_zoom: bool):
    """Time each stage of a prediction by wrapping the functions the segmenter calls (and
    swap the resampling for zoom's when USE_ZOOM)."""
    from medpipe.inference import images, segmenter
    from medpipe.preprocessing import cases, resampling

    seconds: dict[str, float] = defaultdict(float)
    patched = [(images, "read_image"), (cases, "crop_and_normalise"),
               (cases, "resample_images"), (segmenter, "predict_probabilities"),
               (segmenter, "restore_label_from_probabilities")]
    names = dict(zip([name for _, name in patched], STAGES, strict=True))
    originals = [(module, name, getattr(module, name)) for module, name in patched]
    resize = resampling.resize

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start
        return wrapper

    for module, name, function in originals:
        setattr(module, name, timed(names[name], function))
    if use_zoom:
        resampling.resize = cases.resize = zoom_resize
    try:
        yield seconds
    finally:
        for module, name, function in originals:
            setattr(module, name, function)
        resampling.resize = cases.resize = resize


def dice_per_class(a, b, classes) -> dict[str, float]:
    import numpy as np

    out = {}
    for name, value in classes.items():
        x, y = a == value, b == value
        total = np.count_nonzero(x) + np.count_nonzero(y)
        out[name] = 1.0 if total == 0 else 2 * np.count_nonzero(x & y) / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="folder with nnunet/fold_0 (default: a "
                        "one-step run on the bench's demo data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run per resampling")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    root = demo_pipeline()
    if args.runs:
        runs = args.runs
    else:
        from medpipe.training.segmentation import train_segmentation

        runs = one_step_runs(root, ["nnunet"], train_segmentation)
    from medpipe import load_segmenter

    segmenter = load_segmenter(runs / "nnunet" / "fold_0", device="cpu")
    classes = {k: v for k, v in segmenter.labels.items() if v != 0}
    files = {name: path for name, path in scans(root, []).items()}
    results, table = [], []
    for name, path in files.items():
        segmenter.predict(path)  # warm-up
        best = {"matrices": {}, "zoom": {}}
        labels = {}
        for _ in range(args.repeats):
            for method in ("matrices", "zoom"):  # alternating, same scan and weights
                with stage_timer(method == "zoom") as seconds:
                    start = time.perf_counter()
                    labels[method] = segmenter.predict(path).array
                    seconds["total"] = time.perf_counter() - start
                for stage, value in seconds.items():
                    best[method][stage] = min(value, best[method].get(stage, float("inf")))
        agreement = dice_per_class(labels["matrices"], labels["zoom"], classes)
        results.append({"scan": name, "seconds": best, "dice_matrices_vs_zoom": agreement,
                        "identical_labels": bool((labels["matrices"] == labels["zoom"]).all())})
        for method in ("zoom", "matrices"):
            table.append([name, method, *[best[method].get(s, 0.0) for s in STAGES],
                          best[method]["total"], min(agreement.values())])
        print(results[-1], flush=True)
    write_results(
        "resampling_speed", {"repeats": args.repeats, "runs": str(runs), "results": results},
        ["scan", "resampling", *STAGES, "total s", "min Dice vs zoom"], table,
        notes="Stages of one `predict(path)` of nnunet on the CPU (the fastest of "
              f"{args.repeats} alternating runs per stage; `restore`: probability maps back "
              "to the raw grid and argmax). `zoom`: scipy.ndimage.zoom on the volume (nnU-Net's "
              "default resampling); `matrices`: medpipe's resize, one matrix per axis.")


if __name__ == "__main__":
    main()
