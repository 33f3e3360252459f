"""Segmentation inference: seconds and peak memory for one whole scan, per model, with and
without mirroring, through the public API (`load_segmenter(...).predict(path)`: read,
reorient, preprocess, sliding windows, probabilities back on the input grid, argmax).

Scans: a demo brain as stored (3 mm, 66x78x63) and the same brain resampled to 256x256x256
(0.8 mm; the model still runs at its planned 3 mm, so resampling in and out is part of the
cost). Scaling: the demo brain padded to cubes of 64 ... 256 voxels at the model's own
spacing (mirrored copies of the brain filling the cube, so nothing is cropped away:
more sliding windows, no resampling). Peak memory is sampled during each measurement;
`added_memory_mb` is what the prediction added to the process holding the loaded model.
Writes bench/results/inference_speed.json.

    python bench/inference_speed.py [--quick] [--runs demo/results/runs]

Without --runs, each model is trained for one step on the bench's demo data first (weights
do not change the cost of a prediction).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from common import (
    SMOKE,
    WORK,
    demo_pipeline,
    fastest,
    gpu_peak_mb,
    in_fresh_process,
    measured,
    one_step_runs,
    write_results,
)

HERE = Path(__file__).resolve().parent

MODELS = ("unet", "nnunet", "swin_unetr")
REFERENCE_REPEATS = 2  # timed calls where a ratio to nnU-Net is taken (the fastest kept)


def scans(root: Path, sizes: list[int]) -> dict[str, Path]:
    """The demo brain as stored, padded to cubes of SIZES voxels, and at 256^3 (written once)."""
    import numpy as np
    import SimpleITK as sitk

    from medpipe.io import Volume, from_sitk, read_image, to_sitk, write_image

    folder = WORK / "scans"
    original = sorted((root / "raw" / "imagesTr").glob("*_0000.nii.gz"))[0]
    out = {"demo brain 66x78x63 (3 mm)": original}
    volume = read_image(original)
    big = folder / "brain_256.nii.gz"
    if not big.is_file() and not SMOKE:
        image = to_sitk(volume)
        spacing = [n * s / 256 for n, s in zip(image.GetSize(), image.GetSpacing(),
                                              strict=True)]
        resampled = sitk.Resample(image, [256] * 3, sitk.Transform(), sitk.sitkBSpline,
                                  image.GetOrigin(), spacing, image.GetDirection(), 0.0,
                                  sitk.sitkFloat32)
        write_image(from_sitk(resampled), big)
    for size in sizes:
        path = folder / f"brain_pad_{size}.nii.gz"
        if not path.is_file():  # mirrored copies of the brain: no background to crop
            array = volume.array[tuple(slice(0, min(n, size)) for n in volume.shape)]
            array = np.pad(array, [(0, max(size - n, 0)) for n in array.shape],
                           mode="symmetric")
            write_image(Volume(np.ascontiguousarray(array, np.float32), volume.geometry), path)
        out[f"padded to {size}^3 (3 mm)"] = path
    if not SMOKE:  # the smoke run's scans stay small
        out["same brain at 256^3 (0.8 mm)"] = big  # the largest last: memory grows in order
    return out


def in_quick_mode(model: str, scan: str, mirror: bool) -> bool:
    """Quick mode: every model on the demo brain and at 256^3; mirroring (demo brain) and
    scaling (padded cubes) on unet alone."""
    if scan.startswith("padded") or mirror:
        return model == "unet" and not scan.startswith("same")
    return True


def measure_model(run: str, rows: list[tuple[str, str, bool]], repeats: int) -> list[dict]:
    """One model's rows (scan name, path, mirroring), in this process: the model loaded and
    warmed up once (a prediction of the first scan), then each row's `predict(path)`
    (reading the file included) timed REPEATS times, the fastest kept (the least disturbed
    by other load); memory: what the row added above the loaded model."""
    import torch

    from medpipe import load_segmenter

    segmenter = load_segmenter(run, device="auto")
    segmenter.predict(rows[0][1])
    parameters = sum(p.numel() for n in segmenter.networks for p in n.parameters())

    def timed(path: str, mirror: bool) -> dict:
        if segmenter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return {**fastest(lambda: segmenter.predict(path, mirror=mirror), repeats=repeats),
                "device": str(segmenter.device),
                "gpu_peak_mb": gpu_peak_mb(segmenter.device), "parameters": parameters}

    return [{"scan": name, "mirror": mirror, **measured(timed, path, mirror)}
            for name, path, mirror in rows]


def nnunet_python(given: Path | None) -> Path | None:
    """The Python of an environment with nnU-Net v2: GIVEN, else $MEDPIPE_NNUNET_BIN's, else
    the repository's .venv-nnunet (`make test` builds it); None when there is none."""
    candidates = [given] if given else []
    if os.environ.get("MEDPIPE_NNUNET_BIN"):
        candidates.append(Path(os.environ["MEDPIPE_NNUNET_BIN"]) / "python")
    candidates.append(HERE.parent / ".venv-nnunet" / "bin" / "python")
    return next((c for c in candidates if c.is_file()), None)


def measure_nnunet(python: Path, root: Path, run: Path, rows: list[tuple[str, str, bool]],
                   repeats: int) -> list[dict]:
    """nnU-Net v2's predictor on ROWS (`nnunet_reference.py`, in one process of its own
    environment, as ours) with the patch size and features per stage of our nnunet RUN: the
    same network size."""
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    spec = read_run_spec(RunFolder(run))
    features = spec.model_options.features_per_stage or spec.architecture.features_per_stage
    command = [str(python), str(HERE / "nnunet_reference.py"),
               "--dataset", str(root / "raw"), "--work", str(WORK / "nnunet"),
               "--rows", json.dumps([[path, mirror] for _, path, mirror in rows]),
               "--patch-size", ",".join(map(str, spec.patch_size)),
               "--features", ",".join(map(str, features)), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", check=False)
    if done.returncode:
        raise RuntimeError(f"nnU-Net reference failed:\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return [{"scan": name, "mirror": mirror, **result}
            for (name, _, mirror), result in zip(rows, results, strict=True)]


def comparison(ours: list[dict], theirs: list[dict]) -> str:
    """Markdown: our nnunet against nnU-Net v2's predictor, row by row."""
    lines = ["| scan | mirroring | medpipe nnunet s | nnU-Net v2 s | nnU-Net / medpipe | "
             "medpipe MB | nnU-Net MB | parameters (medpipe / nnU-Net) |",
             "|" + " --- |" * 8]
    for a, b in zip(ours, theirs, strict=True):
        lines.append(f"| {a['scan']} | {'yes' if a['mirror'] else 'no'} | {a['seconds']:.2f} | "
                     f"{b['seconds']:.2f} | {b['seconds'] / a['seconds']:.2f} | "
                     f"{a['added_memory_mb']:.0f} | {b['added_memory_mb']:.0f} | "
                     f"{a['parameters'] / 1e6:.2f} M / {b['parameters'] / 1e6:.2f} M |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="folder of MODEL/fold_0 run folders")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--nnunet-python", type=Path,
                        help="Python of an environment with nnU-Net v2 (default: .venv-nnunet)")
    args = parser.parse_args()
    root = demo_pipeline()
    if args.runs:
        runs = args.runs
    else:
        from medpipe.training.segmentation import train_segmentation

        runs = one_step_runs(root, args.models, train_segmentation)
    sizes = [32] if SMOKE else [64, 96] if args.quick else [64, 96, 128, 160, 192, 256]
    files = scans(root, sizes)
    rows, table, reference = [], [], []
    for model in args.models:
        run = runs / model / "fold_0"
        plan = [(name, str(path), mirror) for name, path in files.items()
                for mirror in ((False,) if name.startswith("padded") else (False, True))
                if not args.quick or in_quick_mode(model, name, mirror)]
        repeats = REFERENCE_REPEATS if model == "nnunet" else 1
        results = [{"model": model, **r}
                   for r in in_fresh_process(measure_model, str(run), plan, repeats)]
        if model == "nnunet":
            python = nnunet_python(args.nnunet_python)
            if python is None:
                print("nnU-Net v2 not found (make .venv-nnunet/.installed): no reference")
            else:
                reference = measure_nnunet(python, root, run, plan, repeats)
        rows += results
        for result in results:
            table.append([model, result["scan"], "yes" if result["mirror"] else "no",
                          result["seconds"], result["added_memory_mb"]])
            print(result, flush=True)
    notes = ("Seconds for one `predict(path)`, each model in a fresh process warmed up by "
             f"one prediction (nnunet: the fastest of {REFERENCE_REPEATS}, as on the other side "
             "of the comparison below); MB: resident memory the prediction added to the loaded "
             "model at its peak (scan, preprocessing, probabilities), rows in order of size.")
    if reference:
        ours = [r for r in rows if r["model"] == "nnunet"]
        notes += ("\n\nnnU-Net v2's own predictor (`nnUNetPredictor.predict_single_npy_array`"
                  " after `SimpleITKIO` reads the file; nnU-Net's plans for the same dataset "
                  "with our run's patch size and features per stage; its own environment, "
                  f"torch {reference[0]['torch']}) on the same scans:\n\n"
                  + comparison(ours, reference))
    write_results("inference_speed", {"quick": args.quick, "runs": str(runs), "rows": rows,
                                      "nnunet_reference": reference},
                  ["model", "scan", "mirroring", "seconds", "MB"], table, notes=notes)


if __name__ == "__main__":
    main()
