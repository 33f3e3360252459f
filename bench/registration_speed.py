"""Registration: seconds per pair, peak memory and Dice of the warped labels for identity,
the classical SimpleITK registration (affine + demons, medpipe's defaults), ANTs SyN
(ANTsPy's default `SyN`, deterministic single thread, and with both threads) and each network
(`load_registrator(...).register`: pre-alignment, the network on its grid, the field
composed onto the fixed scan's grid), without any iterative step and as NETWORK_io (the
same with `registration.instance_optimisation`'s default steps per pair), at the demo's
3 mm and at MNI's 1 mm (197x233x189).

The same pairs for every method, brains the networks never saw (demo subjects drawn with
another seed), raw scans in, the field on the fixed grid out, the moving
labels warped through it (`fields.warp_labels`, one way for every method) and compared with
the fixed labels (mean Dice over CSF, grey and white matter). ANTs' worker process is
started before the clock (its ~2 s of imports are paid once per evaluation, not per pair).
Peak memory: resident memory sampled during each pair,
each in a fresh process (the network loaded in it).
Writes bench/results/registration_speed.json.

    python bench/registration_speed.py [--quick] [--runs demo/results/runs]

Networks come from --runs (trained, e.g. by `make demo`: every NAME/fold_0 holding a
registration network is a row, so a network trained with `registration.prealign=moments`
into its own folder is measured beside the others); without it they are trained for one step
on the bench's data, and only their time is meaningful (their Dice is left out).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import demo_pipeline, in_fresh_process, measured, one_step_runs, write_results

NETWORKS = ("voxelmorph", "voxelmorph_diff")
# the pairs are brains no network has seen: demo subjects of another seed (the demo's own
# are seed 0, and its networks trained on most of them); `run_all.py` builds them up front
PAIR_DATA = {
    "3 mm (66x78x63)": {"name": "unseen_6_3mm", "preprocess": False, "seed": 1},
    "1 mm MNI (197x233x189)": {"cases": 2, "spacing": 1.0, "name": "unseen_1mm",
                               "preprocess": False, "seed": 1},
}


def measure(method: str, moving: str, fixed: str, moving_labels: str, fixed_labels: str,
            run: str | None, trained: bool) -> dict:
    """One pair: the field (timed from the two scans on disk), then Dice of warped labels."""
    import numpy as np
    import torch

    from medpipe.io import read_image, to_sitk
    from medpipe.metrics import dice_per_class
    from medpipe.registration.classical import displacement_field, register_classical
    from medpipe.registration.fields import identity_field, warp_with_field

    registrator = ants = None
    if run is not None:
        from medpipe import load_registrator
        from medpipe.config import InstanceOptimisationSettings

        steps = InstanceOptimisationSettings().steps if method.endswith("_io") else 0
        registrator = load_registrator(run, device="auto", refine_steps=steps)
    elif method.startswith("ants"):
        from medpipe.config import AntsSettings
        from medpipe.registration.ants_baseline import AntsRegistration

        ants = AntsRegistration(AntsSettings(deterministic=method == "ants"))
    start = time.perf_counter()
    if registrator is not None:  # paths in: the field comes back as a Volume
        field = to_sitk(registrator.register(moving, fixed).field)
    else:
        fixed_volume, moving_volume = read_image(fixed), read_image(moving)
        if method == "classical":
            field = displacement_field(register_classical(fixed_volume, moving_volume),
                                       fixed_volume)
        elif ants is not None:
            field = displacement_field(ants(fixed_volume, moving_volume), fixed_volume)
        else:
            field = identity_field(fixed_volume.geometry, fixed_volume.shape)
    seconds = time.perf_counter() - start
    if ants is not None:
        ants.close()
    if run is not None and not trained:
        return {"seconds": seconds, "mean_dice": None}  # an untrained network: time only
    warped = warp_with_field(read_image(moving_labels), field, labels=True).array
    reference = read_image(fixed_labels).array
    dice = dice_per_class(torch.from_numpy(warped.astype(np.int64)),
                          torch.from_numpy(reference.astype(np.int64)), int(reference.max()) + 1)
    return {"seconds": seconds, "mean_dice": float(torch.nanmean(dice)),
            "dice_per_class": [float(d) for d in dice]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="folder of NETWORK/fold_0 run folders")
    args = parser.parse_args()
    grids = {grid: demo_pipeline(**settings) for grid, settings in PAIR_DATA.items()}
    trained = args.runs is not None
    networks = list(NETWORKS)
    if args.runs:
        runs = args.runs
        networks = sorted(p.parent.parent.name for p in runs.glob("*/fold_0/training.json")
                          if _is_registration(p.parent))
    else:
        from medpipe.training.registration import train_registration

        runs = one_step_runs(demo_pipeline(), NETWORKS, train_registration)
    rows, table = [], []
    for grid, root in grids.items():
        images = sorted((root / "raw" / "imagesTr").glob("*_0000.nii.gz"))
        labels = sorted((root / "raw" / "labelsTr").glob("*.nii.gz"))
        n_pairs = 1 if args.quick or grid.startswith("1 mm") else 3
        pairs = [(i + 1, i) for i in range(n_pairs)]
        refined = [f"{network}_io" for network in networks]
        for method in ("identity", "classical", "ants", "ants_2_threads", *networks, *refined):
            network = method.removesuffix("_io")
            run = str(runs / network / "fold_0") if network in networks else None
            results = [in_fresh_process(measured, measure, method, str(images[m]),
                                        str(images[f]), str(labels[m]), str(labels[f]), run,
                                        trained)
                       for m, f in pairs]
            seconds = sum(r["seconds"] for r in results) / len(results)
            dice = (None if results[0]["mean_dice"] is None
                    else sum(r["mean_dice"] for r in results) / len(results))
            peak = max(r["added_memory_mb"] for r in results)
            rows.append({"grid": grid, "method": method, "pairs": len(pairs),
                         "seconds_per_pair": seconds, "mean_dice": dice, "added_memory_mb": peak,
                         "per_pair": results})
            table.append([grid, method, seconds, dice, peak])
            print(rows[-1], flush=True)
    for grid in grids:  # classical and ANTs time / network time, per grid
        by_method = {r["method"]: r["seconds_per_pair"] for r in rows if r["grid"] == grid}
        for network in (*networks, *(f"{n}_io" for n in networks)):
            for baseline in ("classical", "ants", "ants_2_threads"):
                ratio = by_method[baseline] / by_method[network]
                rows.append({"grid": grid, "ratio": f"{baseline} / {network}", "value": ratio})
                table.append([grid, f"time ratio {baseline} / {network}", ratio, None, None])
    write_results("registration_speed", {"quick": args.quick, "trained_networks": trained,
                                         "runs": str(runs), "rows": rows},
                  ["grid", "method", "s / pair", "mean Dice", "MB"], table,
                  notes="Seconds from the two scans on disk to the field on the fixed grid "
                        "(pre-alignment included for the networks); Dice of the moving labels "
                        "warped by that field against the fixed labels. ants: ANTsPy SyN, "
                        "deterministic (1 thread); ants_2_threads: the same with 2 threads.")


def _is_registration(folder: Path) -> bool:
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    return read_run_spec(RunFolder(folder)).task == "registration"


if __name__ == "__main__":
    main()
