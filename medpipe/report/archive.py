"""A comparison's runs kept without their store: each finished run's tags, params, metrics,
validation curves and evaluation tables (what `compare.build_report` reads, no model), and
the workflow's files the report reads beside them, in one folder of small text files.

Why: a study run in parts on machines that share no disk (a CPU session at a time, cluster
jobs on different sites) cannot pool its MLflow stores; each part archives its runs into the
same folder (`medpipe compare --archive FOLDER`) and the report is built from their union
(`medpipe compare --runs FOLDER`). The archive also lets anyone rebuild a recorded report
(docs/study/) without training anything. Its layout mirrors the workflow's results folder,
so the folder is also the `results` that `build_report` reads:

    FOLDER/tracked/RUN_ID/run.json     a `TrackedRun` (its files named, held beside it)
    FOLDER/tracked/RUN_ID/cases.csv    ... its evaluation tables and example figure
    FOLDER/test/MODEL/evaluation/      the fold ensemble's test-set scores
    FOLDER/runs/MODEL/postprocessing.json
    FOLDER/benchmarks/                 Snakemake's per-job times (the study's job minutes)
    FOLDER/dataset.json                the data the runs learnt from (the report's scope)

Only finished runs are archived: a report from an archive lists no runs that did not
finish. Jobs every part repeats (the data's verification and preprocessing) keep the last
part's benchmark file, so the archive counts their time once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from medpipe import tracked
from medpipe.errors import MedpipeError
from medpipe.io import atomic_output, write_json
from medpipe.tracking import TrackedRun

TRACKED = "tracked"
RUN_FILE = "run.json"
# what makes two runs one training's: a part run twice archives two runs of it
IDENTITY = (tracked.TASK, tracked.MODEL, tracked.FOLD, tracked.SEED, tracked.RECIPE,
            tracked.EVAL_CASES)
# the workflow's files that build_report (and the study's record) read, relative to RESULTS
RESULT_FILES = ("test/*/evaluation/cases.csv", "test/*/evaluation/summary.json",
                "runs/*/postprocessing.json", "benchmarks/**/*.tsv")


def archive_runs(runs: Sequence[TrackedRun], folder: Path, results: Path | None = None,
                 dataset: Path | None = None) -> list[Path]:
    """Write RUNS into FOLDER (added to what it holds; a run archived again is replaced),
    with RESULTS' files the report reads and DATASET's dataset.json; returns the run files.
    A file of RESULTS replaces the archive's copy: the part that produced it is the newer.
    What an earlier comparison wrote back onto a run (`tracked.REPORT_WRITEBACK`) is left out:
    it belongs to that part's report, and would change the archived run at every part."""
    written = []
    for run in runs:
        target = folder / TRACKED / run.run_id
        target.mkdir(parents=True, exist_ok=True)
        for name, source in run.files.items():
            _copy(Path(source), target / name)
        record = {"run_id": run.run_id, "tags": _own(run.tags), "params": run.params,
                  "metrics": _own(run.metrics), "files": sorted(run.files),
                  "histories": {name: [list(point) for point in points]
                                for name, points in run.histories.items()}}
        written.append(write_json(record, target / RUN_FILE))
    if results is not None:
        for pattern in RESULT_FILES:
            for source in sorted(results.glob(pattern)):
                _copy(source, folder / source.relative_to(results))
    if dataset is not None and (dataset / "dataset.json").is_file():
        _copy(dataset / "dataset.json", folder / "dataset.json")
    return written


def archived_runs(folder: Path) -> list[TrackedRun]:
    """The runs FOLDER's archive holds, as `tracking.finished_runs` returns them from a
    store (their files' paths inside the archive). Refuses an archive holding two runs of
    one training (a part run twice): the report would count them as two runs."""
    files = sorted((folder / TRACKED).glob(f"*/{RUN_FILE}"))
    if not files:
        raise MedpipeError(f"no archived runs (no {TRACKED}/RUN_ID/{RUN_FILE})", folder)
    runs, seen = [], {}
    for path in files:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            run = TrackedRun(
                record["run_id"], record["tags"], record["params"], record["metrics"],
                {name: str(path.parent / name) for name in record["files"]},
                {name: [(int(step), float(value)) for step, value in points]
                 for name, points in record["histories"].items()})
        except (ValueError, KeyError, TypeError) as error:
            raise MedpipeError(f"not an archived run ({error!r})", path) from None
        missing = [name for name, file in run.files.items() if not Path(file).is_file()]
        if missing:
            raise MedpipeError(f"the archived run lacks its {', '.join(missing)}", path)
        identity = tuple(run.tags.get(tag) for tag in IDENTITY)
        if identity in seen:
            raise MedpipeError(f"two archived runs of one training ({', '.join(map(str, identity))}"
                               f"): {seen[identity]} too; remove the older", path)
        seen[identity] = path
        runs.append(run)
    return runs


def replace_archive(runs: Sequence[TrackedRun], folder: Path, results: Path | None = None,
                    dataset: Path | None = None) -> None:
    """FOLDER holding RUNS alone (`archive_runs` into a new folder, then swapped in): a
    record's archive is exactly the runs it records, whatever an earlier record left."""
    staging = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    archive_runs(runs, staging, results, dataset)
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


def _own(values: dict) -> dict:
    return {key: value for key, value in values.items() if key not in tracked.REPORT_WRITEBACK}


def _copy(source: Path, target: Path) -> None:
    with atomic_output(target) as staging:
        shutil.copyfile(source, staging)
