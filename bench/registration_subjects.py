"""Registration: forward-pass Dice against the number of training subjects, as Liu et al.
(MIDL 2025) measured it for their pyramid (LUMIR: 0.764 from 10 subjects, 0.772 from 3,384).

A network (default `pyramid`) is trained on the first K training subjects of fold 0 for each
K, every run with the same budget of pairs (so a smaller K repeats its pairs more often),
and scored by forward passes on the held-out test pairs of a prepared workflow results
folder (`make demo` or `make study`: the study's 20 test pairs with `--pairs 20`), every run
through `evaluate-reg`'s own scoring. The folder's preprocessed cases and plans are read,
never written: each K gets its own results folder beside the bench's JSON, with a splits
file that keeps fold 0's validation cases and only K of its training cases.

With --unlabelled, each K is run instead with fold 0's other training subjects as unlabelled
scans (a dataset folder beside the JSON whose imagesTrUnlabelled links their images): what
scans without labels add to K labelled ones. --set KEY=VALUE (config overrides, e.g.
models.pyramid.options.global_stage=none) trains a variant, named in its row. Rows are merged
into the JSON by (K, unlabelled, overrides).
Writes bench/results/registration_subjects.json.

    python bench/registration_subjects.py --config configs/demo.yaml [--subjects 2 4 9]
        [--pairs 20] [--budget 100] [--model pyramid] [--unlabelled] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, WORK, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model", default="pyramid")
    parser.add_argument("--subjects", type=int, nargs="+", default=[2, 4, 9])
    parser.add_argument("--pairs", type=int, default=20, help="held-out test pairs scored")
    parser.add_argument("--budget", type=int, default=100, help="training pairs per run")
    parser.add_argument("--unlabelled", action="store_true",
                        help="fold 0's other training subjects as unlabelled scans")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for a variant")
    args = parser.parse_args()

    from medpipe.config import load_config
    from medpipe.data.layout import DATASET_JSON, UNLABELLED_DIR, load_dataset
    from medpipe.data.splits import fold_case_ids
    from medpipe.evaluation.registration import evaluate_registration
    from medpipe.training.registration import train_registration

    base = load_config(args.config)
    train_ids, val_ids = fold_case_ids(base.splits_file, 0)
    earlier = RESULTS / "registration_subjects.json"
    rows = json.loads(earlier.read_text())["rows"] if earlier.is_file() else []
    for k in sorted(args.subjects):
        if k > len(train_ids):
            raise SystemExit(f"fold 0 has {len(train_ids)} training subjects, not {k}")
        extra = train_ids[k:] if args.unlabelled else []
        name = (f"{args.model}_{k}" + (f"_unlabelled_{len(extra)}" if extra else "")
                + "".join(f"_{o.rsplit('.', 1)[-1]}" for o in args.overrides))
        results = WORK / "registration_subjects" / name
        results.mkdir(parents=True, exist_ok=True)
        dataset = base.dataset
        if extra:  # the dataset with the extra subjects moved to the unlabelled scans
            dataset = results / "raw"
            raw = load_dataset(base.dataset)
            spec = json.loads((raw.root / DATASET_JSON).read_text())
            kept = [c for c in raw.training if c.case_id not in extra]
            files = ([(f, "imagesTr") for c in kept for f in c.images]
                     + [(c.label, "labelsTr") for c in kept]
                     + [(f, "imagesTs") for c in raw.test for f in c.images]
                     + [(c.label, "labelsTs") for c in raw.test if c.label]
                     + [(raw.case(i).images[0], UNLABELLED_DIR) for i in extra])
            for path, folder in files:  # links to the prepared dataset's files
                link = dataset / folder / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(path.resolve())
            (dataset / DATASET_JSON).write_text(json.dumps(spec | {"numTraining": len(kept)}))
        splits = results / "splits.json"
        splits.write_text(json.dumps([{"train": train_ids[:k], "val": val_ids}]))
        for name in ("plans.json", "preprocessed"):  # read-only links to the prepared data
            link = results / name
            if not link.exists():
                link.symlink_to((Path(base.results) / name).resolve())
        config = load_config(args.config, [
            f"results={results}", f"dataset={dataset}", "tracking.enabled=false",
            f"registration.eval_pairs={args.pairs}",
            f"models.{args.model}.training.budget_samples={args.budget}", *args.overrides])
        run = train_registration(config, args.model, 0, results / "run", progress=False)
        # the run's own training time (a finished run is resumed, not retrained)
        minutes = json.loads((run / "training.json").read_text())["training_seconds"] / 60
        summary = evaluate_registration(config, args.model, 0, run, device="auto")
        row = {"subjects": k, "training_cases": train_ids[:k], "unlabelled_scans": extra,
               "overrides": args.overrides, "pairs_seen": args.budget,
               "training_minutes": minutes, "test_pairs": summary["pairs"],
               "mean_dice": summary["mean_dice"]["mean"], "sd": summary["mean_dice"]["std"],
               "folding_percent": summary["folding_percent"]["mean"],
               "seconds_per_pair": summary["seconds"]["mean"]}
        print(row, flush=True)
        rows = [r for r in rows if key(r) != key(row)] + [row]
    rows.sort(key=key)
    table = [[r["subjects"], len(r.get("unlabelled_scans", [])), " ".join(r.get("overrides", [])),
              r["pairs_seen"], r["training_minutes"], r["mean_dice"], r["sd"],
              r["folding_percent"]] for r in rows]
    write_results("registration_subjects",
                  {"config": str(args.config), "model": args.model, "rows": rows},
                  ["labelled subjects", "unlabelled scans", "variant", "pairs seen",
                   "training min", "mean Dice", "SD", "folding %"], table,
                  notes=f"{args.model} trained on the first K training subjects of fold 0 "
                        "(and, where counted, the others as unlabelled scans) with the pairs "
                        f"seen each, scored by forward passes on {args.pairs} held-out test "
                        "pairs (evaluate-reg's scoring).")


def key(row: dict) -> tuple:
    return row["subjects"], len(row.get("unlabelled_scans", [])), row.get("overrides", [])


if __name__ == "__main__":
    main()
