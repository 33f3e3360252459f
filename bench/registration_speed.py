"""Registration: seconds per pair, peak memory and Dice of the warped labels for identity,
the classical SimpleITK registration (affine + demons, medpipe's defaults), ANTs SyN
(ANTsPy's quick default `SyN`, deterministic single thread, and with both threads), ANTs'
standard preset `antsRegistrationSyN[s]` (both threads) and each network
(`load_registrator(...).field`: pre-alignment, the network on its grid, the field composed
onto the fixed scan's grid) by forward passes only (NETWORK), after an iterative SimpleITK
affine pre-alignment instead of the centres of mass (NETWORK+affine), and refined per pair
by `registration.instance_optimisation`'s default steps (NETWORK_io on the network's grid,
NETWORK_io_Smm on a grid of S mm), at the demo's 3 mm and at MNI's 1 mm (197x233x189).

The same pairs for every method, brains the networks never saw (demo subjects drawn with
another seed), the methods run back to back on each pair. Both scans are read before the
clock (reading is timed on its own, `read_seconds`: the same for every method); the clock
runs from the two scans in memory to the field on the fixed grid. A network's first call in
a process pays one-off set-up (oneDNN kernels, thread pools): it is timed (`first_seconds`)
and the pair registered again for `seconds`, as a service would. The moving labels are
warped through each field (`fields.warp_labels`, one way for every method) and compared
with the fixed labels (mean Dice over CSF, grey and white matter). ANTs' worker process is
started before the clock (its ~2 s of imports are paid once per evaluation, not per pair).
Peak memory: resident memory sampled during each pair, each in a fresh process (the network
loaded in it). Writes bench/results/registration_speed.json.

    python bench/registration_speed.py [--quick] [--runs demo/results/runs]

Networks come from --runs (trained, e.g. by `make demo`: every NAME/fold_0 holding a
registration network is a row); without it they are trained for one step on the bench's
data, and only their time is meaningful (their Dice is left out).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    SMOKE,
    demo_pipeline,
    in_fresh_process,
    measured,
    one_step_runs,
    write_results,
)

NETWORKS = ("voxelmorph", "voxelmorph_diff", "pyramid")
# the pairs are brains no network has seen: demo subjects of another seed (the demo's own
# are seed 0, and its networks trained on most of them); `run_all.py` builds them up front
PAIR_DATA = {
    "3 mm (66x78x63)": {"name": "unseen_6_3mm", "preprocess": False, "seed": 1},
    "1 mm MNI (197x233x189)": {"cases": 2, "spacing": 1.0, "name": "unseen_1mm",
                               "preprocess": False, "seed": 1},
}
# left out of --quick: ANTs' standard preset at 1 mm takes about 30 min a pair on 2 cores
SLOW_IN_QUICK = {"1 mm MNI (197x233x189)": ("ants_standard_2_threads",)}
# grids (mm) a refinement runs on besides the network's own, per data grid
REFINE_SPACINGS = {"3 mm (66x78x63)": (3.0,), "1 mm MNI (197x233x189)": (3.0, 2.0)}
BASELINES = ("identity", "classical", "ants", "ants_2_threads", "ants_standard_2_threads")


@dataclass(frozen=True)
class Method:
    """One row: a baseline, or a network (forward passes, affine pre-aligned, refined)."""

    name: str
    network: str | None = None
    refine_spacing: float | None = None  # with `refined`: None is the network's grid
    refined: bool = False
    affine: bool = False


def methods(networks: list[str], grid: str) -> list[Method]:
    rows = [Method(name) for name in BASELINES]
    for network in networks:
        rows += [Method(network, network), Method(f"{network}+affine", network, affine=True),
                 Method(f"{network}_io", network, refined=True)]
        rows += [Method(f"{network}_io_{s:g}mm", network, s, refined=True)
                 for s in REFINE_SPACINGS[grid]]
    return rows


def measure(method: Method, moving: str, fixed: str, moving_labels: str, fixed_labels: str,
            run: str | None, trained: bool) -> dict:
    """One pair: the field from the two scans in memory, then Dice of warped labels."""
    import numpy as np
    import torch

    from medpipe.io import read_image
    from medpipe.metrics import dice_per_class
    from medpipe.registration.classical import displacement_field, register_classical
    from medpipe.registration.fields import identity_field, warp_with_field

    registrator = ants = None
    if method.network is not None:
        from medpipe import load_registrator
        from medpipe.config import InstanceOptimisationSettings

        steps = InstanceOptimisationSettings().steps if method.refined else 0
        spacing = None if method.refine_spacing is None else (method.refine_spacing,) * 3
        registrator = load_registrator(run, device="auto", refine_steps=steps,
                                       refine_spacing=spacing)
        if method.affine:  # the same network, after the iterative pre-alignment
            spec = registrator.method.spec
            registrator.method.spec = spec.model_copy(update={
                "registration": spec.registration.model_copy(update={"prealign": "affine"})})
    elif method.name.startswith("ants"):
        from medpipe.config import ANTS_STANDARD, AntsSettings
        from medpipe.registration.ants_baseline import AntsRegistration

        transform = ANTS_STANDARD if "standard" in method.name else "SyN"
        ants = AntsRegistration(AntsSettings(
            transform=transform, deterministic=not method.name.endswith("2_threads")))
    start = time.perf_counter()
    fixed_volume, moving_volume = read_image(fixed), read_image(moving)
    read_seconds = time.perf_counter() - start

    def register():
        if registrator is not None:
            return registrator.field(moving_volume, fixed_volume)
        if method.name == "classical":
            return displacement_field(register_classical(fixed_volume, moving_volume),
                                      fixed_volume)
        if ants is not None:
            return displacement_field(ants(fixed_volume, moving_volume), fixed_volume)
        return identity_field(fixed_volume.geometry, fixed_volume.shape)

    start = time.perf_counter()
    field = register()
    first_seconds = seconds = time.perf_counter() - start
    if registrator is not None:
        start = time.perf_counter()
        field = register()
        seconds = time.perf_counter() - start
    if ants is not None:
        ants.close()
    timing = {"seconds": seconds, "first_seconds": first_seconds, "read_seconds": read_seconds}
    if run is not None and not trained:
        return {**timing, "mean_dice": None}  # an untrained network: time only
    warped = warp_with_field(read_image(moving_labels), field, labels=True).array
    reference = read_image(fixed_labels).array
    dice = dice_per_class(torch.from_numpy(warped.astype(np.int64)),
                          torch.from_numpy(reference.astype(np.int64)), int(reference.max()) + 1)
    return {**timing, "mean_dice": float(torch.nanmean(dice)),
            "dice_per_class": [float(d) for d in dice]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, help="folder of NETWORK/fold_0 run folders")
    parser.add_argument("--only", nargs="*", help="only these methods (a partial JSON)")
    args = parser.parse_args()
    grids = {grid: demo_pipeline(**settings) for grid, settings in PAIR_DATA.items()
             if not SMOKE or grid.startswith("3 mm")}
    trained = args.runs is not None
    networks = list(NETWORKS)
    if args.runs:
        runs = args.runs
        networks = sorted(p.parent.parent.name for p in runs.glob("*/fold_0/training.json")
                          if _is_registration(p.parent))
    else:
        from medpipe.training.registration import train_registration

        wanted = [n for n in NETWORKS if not args.only or any(m.startswith(n) for m in args.only)]
        runs = one_step_runs(demo_pipeline(), wanted, train_registration)
    rows, table = [], []
    for grid, root in grids.items():
        images = sorted((root / "raw" / "imagesTr").glob("*_0000.nii.gz"))
        labels = sorted((root / "raw" / "labelsTr").glob("*.nii.gz"))
        n_pairs = 1 if args.quick or grid.startswith("1 mm") else 3
        pairs = [(i + 1, i) for i in range(n_pairs)]
        grid_methods = [m for m in methods(networks, grid)
                        if (not args.only or m.name in args.only)
                        and not (args.quick and m.name in SLOW_IN_QUICK.get(grid, ()))]
        results: dict[str, list[dict]] = {m.name: [] for m in grid_methods}
        for m, f in pairs:  # back to back on each pair
            for method in grid_methods:
                run = str(runs / method.network / "fold_0") if method.network else None
                results[method.name].append(in_fresh_process(
                    measured, measure, method, str(images[m]), str(images[f]),
                    str(labels[m]), str(labels[f]), run, trained))
                print(grid, method.name, results[method.name][-1], flush=True)
        for method in grid_methods:
            per_pair = results[method.name]
            row = {"grid": grid, "method": method.name, "pairs": len(pairs),
                   **{key: _mean(per_pair, key) for key in
                      ("seconds", "first_seconds", "read_seconds", "mean_dice")},
                   "added_memory_mb": max(r["added_memory_mb"] for r in per_pair),
                   "per_pair": per_pair}
            rows.append(row)
            table.append([grid, method.name, row["seconds"], row["seconds"]
                          + row["read_seconds"], row["mean_dice"], row["added_memory_mb"]])
    for grid in grids:  # classical and ANTs time / network time, per grid
        by_method = {r["method"]: r for r in rows if r["grid"] == grid}
        for name, row in by_method.items():
            if name in BASELINES:
                continue
            for baseline in ("classical", "ants", "ants_2_threads", "ants_standard_2_threads"):
                if baseline not in by_method:
                    continue
                base = by_method[baseline]
                ratio = base["seconds"] / row["seconds"]
                from_disk = ((base["seconds"] + base["read_seconds"])
                             / (row["seconds"] + row["read_seconds"]))
                rows.append({"grid": grid, "ratio": f"{baseline} / {name}", "value": ratio,
                             "value_from_disk": from_disk})
                table.append([grid, f"time ratio {baseline} / {name}", ratio, from_disk,
                              None, None])
    write_results("registration_speed", {"quick": args.quick, "trained_networks": trained,
                                         "runs": str(runs), "rows": rows},
                  ["grid", "method", "s / pair (in memory)", "s / pair (from disk)",
                   "mean Dice", "MB"], table,
                  notes="Seconds from the two scans in memory to the field on the fixed grid "
                        "(pre-alignment included for the networks; a network's second call in "
                        "its process), and the same with both scans read from disk; ratios "
                        "likewise. Dice of the moving labels warped by that field against the "
                        "fixed labels. ants: ANTsPy's quick SyN, deterministic (1 thread); "
                        "ants_2_threads: the same with 2 threads; ants_standard_2_threads: "
                        "ANTs' standard preset antsRegistrationSyN[s] with 2 threads.")


def _mean(per_pair: list[dict], key: str) -> float | None:
    values = [r[key] for r in per_pair]
    return None if values[0] is None else sum(values) / len(values)


def _is_registration(folder: Path) -> bool:
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    return read_run_spec(RunFolder(folder)).task == "registration"


if __name__ == "__main__":
    main()
