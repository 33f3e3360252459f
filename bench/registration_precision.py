"""Registration: what mixed precision changes in a trained network's answers. Each run folder
named is scored twice on the held-out pairs of a prepared workflow results folder (`make
demo` or `make study`), through `evaluate-reg`'s own scoring: once with its layers under
autocast where the device computes it natively (bf16 on a GPU or a CPU with AVX-512 BF16/AMX;
the geometry float32 either way) and once in float32 throughout. Mean Dice, folding, SDlogJ
and seconds per pair of both, and the paired Dice difference per pair.

The run folders are copied beside the JSON before scoring (the evaluation writes into its run
folder; the originals and their MLflow runs are left as they were); tracking is off.
Writes bench/results/registration_precision.json.

    python bench/registration_precision.py --config configs/study.yaml \
        --set dataset=study/raw results=study/results \
        --runs study/results/runs/pyramid/fold_0 study/results/runs/pyramid/seed_1/fold_0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import WORK, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="trained registration run folders (RESULTS/runs/MODEL/...)")
    args = parser.parse_args()

    import numpy as np

    from medpipe.config import load_config
    from medpipe.evaluation.registration import evaluate_registration
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    config = load_config(args.config, [*args.overrides, "tracking.enabled=false"])
    rows, table = [], []
    for run in args.runs:
        spec = read_run_spec(RunFolder(run))
        scores = {}
        for amp in (True, False):
            copy = WORK / "registration_precision" / "_".join(run.parts[-3:]) / (
                "amp" if amp else "fp32")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evaluation*"))
            summary = evaluate_registration(config, spec.model, spec.fold, copy, amp=amp)
            per_pair = (copy / "evaluation" / "pairs.csv").read_text().splitlines()
            scores[amp] = (summary, _pair_dice(per_pair))
        (mixed, mixed_pairs), (full, full_pairs) = scores[True], scores[False]
        if full["precision"] != "float32":
            raise SystemExit(f"{run}: the float32 evaluation ran in {full['precision']}")
        differences = np.array(mixed_pairs) - np.array(full_pairs)
        row = {"run": str(run), "model": spec.model, "pairs": full["pairs"],
               **{f"{name}_{key}": value for name, summary in (("amp", mixed), ("fp32", full))
                  for key, value in (("precision", summary["precision"]),
                                     ("mean_dice", summary["mean_dice"]["mean"]),
                                     ("sd", summary["mean_dice"]["std"]),
                                     ("folding_percent", summary["folding_percent"]["mean"]),
                                     ("sdlogj", summary["sdlogj"]["mean"]),
                                     ("seconds_per_pair", summary["seconds"]["mean"]))},
               "dice_difference_mean": float(differences.mean()),
               "dice_difference_max_abs": float(np.abs(differences).max())}
        print(row, flush=True)
        rows.append(row)
        table.append([str(run), row["amp_precision"], row["amp_mean_dice"],
                      row["fp32_mean_dice"], row["dice_difference_max_abs"],
                      row["amp_folding_percent"], row["fp32_folding_percent"],
                      row["amp_seconds_per_pair"], row["fp32_seconds_per_pair"]])
    write_results("registration_precision",
                  {"config": str(args.config), "overrides": args.overrides, "rows": rows},
                  ["run", "AMP dtype", "Dice (AMP)", "Dice (fp32)", "max |pair difference|",
                   "folding % (AMP)", "folding % (fp32)", "s/pair (AMP)", "s/pair (fp32)"],
                  table,
                  notes="Each network scored by evaluate-reg on the same held-out pairs, its "
                        "layers under autocast (AMP) and in float32; the geometry is float32 "
                        "in both. Dice: mean over pairs of the pair's mean label Dice.")


def _pair_dice(lines: list[str]) -> list[float]:
    """Each pair's mean Dice over its classes, in the table's pair order."""
    import csv

    import numpy as np

    by_pair: dict[tuple[str, str], list[float]] = {}
    for row in csv.DictReader(lines):
        by_pair.setdefault((row["moving"], row["fixed"]), []).append(float(row["dice"]))
    return [float(np.nanmean(d)) for d in by_pair.values()]


if __name__ == "__main__":
    main()
