"""The study's recorded answer: `make study`'s report and what its MLflow store says, copied
into the repository (docs/study/) with the machine it ran on.

What is read back from the store, not from the workflow's files: the latest comparison
run's headline metrics (each model's mean foreground Dice on the scope its params name: the
test set's cases, the test pairs) and, per compared run, its budget and costs. The targets
of the study (nnunet and unet >= 0.80 mean foreground Dice on >= 20 test brains; >= 3 training
runs of each segmentation model) are checked against those numbers and written beside them.

    python bench/study_record.py study/results docs/study [--started EPOCH_SECONDS]
                                 [--wall-minutes M]
    python bench/study_record.py --archive docs/study/runs --report REPORT_DIR docs/study

The record keeps the compared runs themselves (docs/study/runs/, `medpipe.report.archive`:
no models), so its report can be rebuilt and a study run in parts on machines that share no
disk is recorded from the union of its parts' archives (the second form: the report built by
`medpipe compare --runs docs/study/runs`).

The wall time counts from the first `make study`; `job_minutes` sums the jobs' own times
(Snakemake's benchmark files, archived with the runs), which is the study's cost when it was
run in parts (less the data's preparation, which every part repeats and the archive counts
once). `machine` is where the record was written: the trainings' machines are each run's
`host` (`hosts` lists them), as a study run in parts may span several.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import machine

from medpipe import tracked
from medpipe.report.archive import archived_runs, replace_archive
from medpipe.report.compare import headline_scores, run_order
from medpipe.tracking import TrackedRun, finished_runs

TARGET_DICE = 0.80
TARGET_MODELS = ("nnunet", "unet")
MIN_TEST_CASES = 20
# repeated training runs: run-to-run variance in every claim (the study's `seeds`)
RUNS_MODELS = ("unet", "nnunet", "nnunet_resenc", "swin_unetr")
MIN_RUNS = 3
REPORT_FILES = ("report.html", "report.md", "summary.json")


def read_store(uri: str) -> tuple[dict, list[TrackedRun]]:
    """The latest comparison run of the store and the runs it compared (as the record
    states them, and as `TrackedRun`s for the archive)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments],
                              f"tags.{tracked.TASK} = '{tracked.COMPARISON}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"{uri}: no comparison run (run `medpipe compare` first)")
    parent = runs[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.{tracked.COMPARISON_RUN} = '{parent.info.run_id}'", max_results=10000)
    compared = {run.info.run_id for run in children}
    experiment = client.get_experiment(parent.info.experiment_id).name
    tracked_runs = [r for r in finished_runs(uri, experiment) if r.run_id in compared]
    return ({"comparison_run": parent.info.run_id, "git_commit":
             parent.data.tags.get(tracked.GIT_COMMIT), **provenance(tracked_runs),
             "scores": dict(parent.data.metrics), "scopes": dict(parent.data.params),
             "runs": run_rows(tracked_runs)}, tracked_runs)


def read_archive(archive: Path, report: Path) -> dict:
    """What `read_store` says, from an archive of runs and the report built from it
    (`medpipe compare --runs`): its summary's scores and scopes, every archived run."""
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    runs = archived_runs(archive)
    return {"comparison_run": None, "git_commit": None, **provenance(runs),
            "scores": headline_scores(summary),
            "scopes": {key: summary[key] for key in ("segmentation_scope",
                                                     "registration_scope")},
            "runs": run_rows(runs)}


def provenance(runs: list[TrackedRun]) -> dict:
    """The commits the runs were trained at and the machines their costs come from."""
    return {key: sorted({r.tags.get(tag, "") for r in runs} - {""})
            for key, tag in (("run_commits", tracked.GIT_COMMIT), ("hosts", tracked.HOST))}


def run_rows(runs: list[TrackedRun]) -> list[dict]:
    """Per compared run: what it is, its budget and costs."""
    rows = []
    for run in sorted(runs, key=run_order):
        rows.append({
            "task": run.tags.get(tracked.TASK), "model": run.tags.get(tracked.MODEL),
            "fold": run.tags.get(tracked.FOLD), "seed": run.tags.get(tracked.SEED),
            "recipe": run.tags.get(tracked.RECIPE), "device": run.tags.get(tracked.DEVICE),
            "host": run.tags.get(tracked.HOST),
            **{key: run.metrics.get(key) for key in (
                tracked.SAMPLES_SEEN, tracked.TRAINING_SECONDS, tracked.PARAMETERS,
                tracked.EVAL_MEAN_DICE, tracked.EVAL_SECONDS_PER_CASE,
                tracked.EVAL_SECONDS_PER_PAIR, tracked.SKIPPED_STEPS_TOTAL)
               if key in run.metrics}})
    return rows


def job_minutes(results: Path) -> float:
    """The workflow's jobs' summed wall time (Snakemake's `benchmark:` files, one per job):
    the study's cost when it ran in parts, the idle time between them left out."""
    import csv

    seconds = 0.0
    for table in results.glob("benchmarks/**/*.tsv"):
        with open(table, newline="", encoding="utf-8") as f:
            seconds += sum(float(row["s"]) for row in csv.DictReader(f, delimiter="\t"))
    return round(seconds / 60, 1)


def check_targets(store: dict) -> dict:
    scope = store["scopes"].get("segmentation_scope", "")
    n = int(scope.rsplit("= ", 1)[-1].split()[0]) if "test set" in scope else 0
    checks = {f"{model} mean foreground Dice >= {TARGET_DICE}":
              store["scores"].get(f"mean_dice_{model}", float("nan")) >= TARGET_DICE
              for model in TARGET_MODELS}
    checks[f"scored on >= {MIN_TEST_CASES} test cases"] = n >= MIN_TEST_CASES
    for model in RUNS_MODELS:
        runs = sum(r["task"] == "segmentation" and r["model"] == model for r in store["runs"])
        checks[f"{model}: >= {MIN_RUNS} training runs"] = runs >= MIN_RUNS
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", help="the study's results folder")
    parser.add_argument("out", type=Path, help="where the record goes (docs/study)")
    parser.add_argument("--archive", type=Path, help="record from this archive of runs "
                        "instead of a results folder's store")
    parser.add_argument("--report", type=Path, help="with --archive: the folder of the report "
                        "`medpipe compare --runs ARCHIVE` wrote")
    parser.add_argument("--started", type=float, help="the study's start, seconds since "
                        "the epoch (the Makefile writes it), for its wall time")
    parser.add_argument("--wall-minutes", type=float, help="the study's wall time, where the "
                        "record is rewritten after the run (a report rebuilt, say)")
    args = parser.parse_args()
    archive = args.out / "runs"
    if args.archive is not None:
        if args.report is None:
            parser.error("--archive needs --report")
        store, report = read_archive(args.archive, args.report), args.report
        if args.archive.resolve() != archive.resolve():
            replace_archive(archived_runs(args.archive), archive, args.archive, args.archive)
    elif args.results is not None:
        store, runs = read_store(f"sqlite:///{(args.results / 'mlflow.db').resolve()}")
        report = args.results / "compare"
        dataset = args.results.parent / "raw"
        replace_archive(runs, archive, args.results, dataset if dataset.is_dir() else None)
    else:
        parser.error("give the study's results folder, or --archive and --report")
    record = {"machine": machine(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "wall_minutes": args.wall_minutes if args.wall_minutes is not None
              else round((time.time() - args.started) / 60, 1) if args.started else None,
              "job_minutes": job_minutes(archive),
              **store, "targets": check_targets(store)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        shutil.copyfile(report / name, args.out / name)
    (args.out / "mlflow_summary.json").write_text(json.dumps(record, indent=2) + "\n",
                                                  encoding="utf-8")
    for target, met in record["targets"].items():
        print(f"{'met' if met else 'MISSED'}: {target}")
    print(f"wrote {args.out} (wall time {record['wall_minutes']} min, the jobs' own "
          f"{record['job_minutes']} min)")


if __name__ == "__main__":
    main()
