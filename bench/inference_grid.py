"""Does a trained segmenter give the same answer for a scan stored another way?

Each test scan is re-written three ways: axes permuted and flipped (PIR) with a shifted
origin; resampled to an anisotropic grid; and both. The prediction on each version is
mapped back onto the original grid (nearest neighbour, undoing the origin shift) and
compared with the prediction on the original scan: Dice per class (issue 6's check asks
>= 0.95). Three ways back: the label map (nearest neighbour), the class probabilities
(linear, then argmax, as nnU-Net exports), and, as the ceiling that resampling alone allows,
the original prediction sent to the other grid and back (nearest). Where the scans have
reference labels (`labelsTs` beside `imagesTs`), also the Dice against them on the scan as
stored and on each re-written version (its answer brought back): whether the model is as
right on the re-written scan as on the original. Writes bench/results/inference_grid.json.

    python bench/inference_grid.py --model demo/results/runs/unet/fold_0 --scans demo/raw/imagesTs
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medpipe import load_segmenter
from medpipe.io import Geometry, Volume, from_sitk, read_image, reorient, to_sitk

SHIFT = (13.5, -7.0, 22.0)  # mm, added to the origin


def rewrite(scan: Volume, codes: str | None, spacing: tuple | None) -> Volume:
    image = to_sitk(scan)
    if spacing is not None:
        size = [round(n * s / t) for n, s, t in
                zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(),
                              spacing, image.GetDirection(), 0.0, sitk.sitkFloat32)
    volume = from_sitk(image)
    if codes is not None:
        volume = reorient(volume, codes)
    g = volume.geometry
    return Volume(volume.array, Geometry(g.spacing, tuple(o + s for o, s in zip(g.origin, SHIFT,
                                                                                strict=True)),
                                         g.direction))


def back_on(image: Volume, original: Volume, linear: bool = False) -> np.ndarray:
    """IMAGE (on a re-written grid) on ORIGINAL's grid, undoing the origin shift."""
    shift = sitk.TranslationTransform(3, SHIFT)  # original point -> where it moved to
    reference = to_sitk(original.with_array(np.zeros(original.shape, np.uint8)))
    method = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return from_sitk(sitk.Resample(to_sitk(image), reference, shift, method, 0)).array


def round_trip(labels: Volume, version: Volume) -> np.ndarray:
    """LABELS sent onto VERSION's grid and back (nearest both ways): what resampling alone
    loses, whatever the model."""
    unshift = sitk.TranslationTransform(3, tuple(-s for s in SHIFT))
    grid = to_sitk(version.with_array(np.zeros(version.shape, np.uint8)))
    there = from_sitk(sitk.Resample(to_sitk(labels), grid, unshift, sitk.sitkNearestNeighbor, 0))
    return back_on(there, labels)


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return float(2 * (x & y).sum() / max(x.sum() + y.sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scans", required=True, type=Path)
    parser.add_argument("--spacing", default="2.0,3.5,4.5", help="anisotropic spacing, mm")
    parser.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation")
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference_grid.json"))
    args = parser.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    segmenter = load_segmenter(args.model)
    classes = {n: v for n, v in segmenter.labels.items() if v != 0}
    variants = {"PIR, origin shifted": ("PIR", None), "anisotropic": (None, spacing),
                "anisotropic + PIR + shifted": ("PIR", spacing)}
    rows = []
    for path in sorted(args.scans.glob("*_0000.nii.gz")):
        scan = read_image(path)
        original = segmenter.predict(scan, mirror=args.mirror)
        reference = original.array
        truth_file = args.scans.parent / "labelsTs" / path.name.replace("_0000", "")
        truth = read_image(truth_file).array if truth_file.is_file() else None
        if truth is not None:  # how right the model is on the scan as stored
            rows.append({"scan": path.name, "variant": "original", "shape": list(scan.shape),
                         "spacing": list(scan.geometry.spacing),
                         **{f"truth_{c}": dice(truth, reference, v) for c, v in classes.items()}})
        for name, (codes, new_spacing) in variants.items():
            version = rewrite(scan, codes, new_spacing)
            start = time.perf_counter()
            labels, probabilities = segmenter.predict(version, probabilities=True,
                                                      mirror=args.mirror)
            seconds = time.perf_counter() - start
            assert labels.shape == version.shape and labels.geometry == version.geometry
            ways = {"labels": back_on(labels, scan),
                    "probabilities": back_on(probabilities, scan, linear=True).argmax(-1),
                    "ceiling": round_trip(original, version)}
            rows.append({"scan": path.name, "variant": name, "shape": list(version.shape),
                         "spacing": list(version.geometry.spacing), "seconds": seconds,
                         **{f"dice_{c}_{way}": dice(reference, back, v)
                            for way, back in ways.items() for c, v in classes.items()}})
            if truth is not None:  # and on the re-written scan, its answer brought back
                rows[-1].update({f"truth_{c}": dice(truth, ways["probabilities"], v)
                                 for c, v in classes.items()})
            print(json.dumps(rows[-1]))
    result = {"model": str(args.model), "mirror": args.mirror, "machine": platform.platform(),
              "processor": platform.processor(), "rows": rows,
              "min_dice": {f"{c}_{way}": min(r[f"dice_{c}_{way}"] for r in rows
                                             if f"dice_{c}_{way}" in r)
                           for way in ("labels", "probabilities", "ceiling") for c in classes},
              "mean_truth_dice": {
                  variant: {c: float(np.mean([r[f"truth_{c}"] for r in rows
                                              if r["variant"] == variant and f"truth_{c}" in r]))
                            for c in classes}
                  for variant in ["original", *variants] if any(
                      r["variant"] == variant and "truth_" + next(iter(classes)) in r
                      for r in rows)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("min Dice per class:", result["min_dice"])
    print("mean Dice against the reference labels:", result["mean_truth_dice"])


if __name__ == "__main__":
    main()
