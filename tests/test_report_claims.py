"""The report's claims from a hand-made MLflow store: two training runs per model whose
per-run differences agree in sign make a claim, ones that disagree refuse it; one run per
model, or a model still improving, claims nothing; the first screen a reader sees holds the
scope, the verdicts and a figure."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medpipe import tracked
from medpipe.report.compare import build_report
from medpipe.tracking import finished_runs

CASES = [f"case_{k:02d}" for k in range(12)]


def _store(tmp_path, offsets: dict[str, list[float]], curves: dict[str, list[float]] | None = None,
           test_offsets: dict[str, list[float]] | None = None):
    """A sqlite store with one finished segmentation run per (model, offset): seed k of the
    model scores every case at base + offset (+ a little noise), on the same test cases;
    CURVES: the validation Dice at 4 equal steps of the budget (a flat curve by default).
    TEST_OFFSETS: each run's own test-set scores too (`evaluation_test/`, repeated runs)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("claims", artifact_location=str(tmp_path / "art"))
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.85, len(CASES))
    for model, seeds in offsets.items():
        for seed, offset in enumerate(seeds):
            run = client.create_run(experiment, tags={
                tracked.TASK: "segmentation", tracked.MODEL: model, tracked.FOLD: "0",
                tracked.SEED: str(seed), tracked.DEVICE: "cpu"})
            run_id = run.info.run_id
            client.log_param(run_id, "run.batch_size", "2")
            client.log_param(run_id, "run.training.seed", str(seed))
            client.log_param(run_id, "run.dataset_name", "handmade")
            curve = (curves or {}).get(model, [0.5, 0.7, 0.75, 0.75])
            for step, dice in enumerate(curve, start=1):
                client.log_metric(run_id, tracked.VAL_DICE, dice, step=step)
                client.log_metric(run_id, tracked.SAMPLES_SEEN, 100 * step, step=step)
            for name, value in ((tracked.TRAINING_SECONDS, 60.0), (tracked.PARAMETERS, 1e6)):
                client.log_metric(run_id, name, value)
            evaluations = [(tracked.EVALUATION_FOLDER, offset)]
            if test_offsets:
                evaluations.append((tracked.TEST_EVALUATION_FOLDER, test_offsets[model][seed]))
            for folder, shift in evaluations:
                table = tmp_path / f"{model}_{seed}" / folder / "cases.csv"
                table.parent.mkdir(parents=True)
                with open(table, "w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f)
                    writer.writerow(["case_id", "class", "dice", "hd95"])
                    for case, value in zip(CASES, base, strict=True):
                        writer.writerow([case, "a", value + shift + rng.normal(0, 0.002), 2.0])
                client.log_artifact(run_id, str(table), folder)
            client.set_terminated(run_id)
    return finished_runs(uri, "claims")


def _pair(summary, a, b):
    return next(r for r in summary["paired"] if {r["a"], r["b"]} == {a, b})


def test_runs_that_agree_make_the_claim(tmp_path):
    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01]})
    summary = build_report(runs, tmp_path / "out")
    row = _pair(summary, "big", "small")
    assert row["run_level"]["signs_agree"] and row["claimed"]
    assert summary["headline"][0].startswith("Which segmentation model? big segments best")
    assert summary["segmentation"][0]["runs"] == 2


def test_runs_scored_on_the_test_set_are_compared_there(tmp_path):
    # validation cases disagree in sign, each run's own test-set scores agree: the report
    # pairs the runs on the test cases (the same for every run) and claims from them
    runs = _store(tmp_path, {"big": [0.05, -0.005], "small": [0.0, 0.01]},
                  test_offsets={"big": [0.06, 0.05], "small": [0.0, 0.01]})
    summary = build_report(runs, tmp_path / "out")
    assert summary["segmentation_scope"] == (
        f"test set, n = {len(CASES)} cases, each case's mean over 2 runs")
    row = _pair(summary, "big", "small")
    assert row["run_level"]["signs_agree"] and row["claimed"]
    assert row["mean_difference"] == pytest.approx(0.05, abs=0.005)


def test_the_run_column_names_its_cases_when_the_table_is_the_ensembles(tmp_path):
    # the test set scored by each model's fold ensemble only: the table's means are the
    # test set's, the runs' own means their validation cases', and the column says so
    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01]})
    results = tmp_path / "results"
    for model, shift in (("big", 0.1), ("small", 0.0)):
        table = results / "test" / model / "evaluation" / "cases.csv"
        table.parent.mkdir(parents=True)
        table.write_text("case_id,class,dice,hd95\n" + "".join(
            f"{case},a,{0.7 + shift},2.0\n" for case in CASES), encoding="utf-8")
    summary = build_report(runs, tmp_path / "out", results=results)
    assert summary["segmentation_scope"] == f"test set, n = {len(CASES)} cases"
    assert summary["segmentation_runs_on"] == "validation cases"
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| Mean Dice of runs on their validation cases (± SD over runs) |" in markdown
    # runs scored where the table is: no qualifier
    plain = build_report(_store(tmp_path / "plain", {"big": [0.05, 0.04], "small": [0.0, 0.01]}),
                         tmp_path / "plain_out")
    assert plain["segmentation_runs_on"] == "validation cases"
    assert "| Mean Dice of runs (± SD over runs) |" in (
        tmp_path / "plain_out" / "report.md").read_text(encoding="utf-8")


def test_runs_that_disagree_in_sign_refuse_it(tmp_path):
    # big is better on average (+0.02) but one of its runs is worse than one of small's
    runs = _store(tmp_path, {"big": [0.05, -0.005], "small": [0.0, 0.01]})
    summary = build_report(runs, tmp_path / "out")
    row = _pair(summary, "big", "small")
    assert row["mean_difference"] > 0 and not row["run_level"]["signs_agree"]
    assert not row["claimed"]
    assert "a difference is not shown: the run pairs disagree in sign" in summary["headline"][0]


def test_one_run_per_model_ranks_nothing(tmp_path):
    # every case better by 0.05: the cases alone would show it (Wilcoxon p ~ 5e-4)
    runs = _store(tmp_path, {"big": [0.05], "small": [0.0]})
    summary = build_report(runs, tmp_path / "out")
    row = _pair(summary, "big", "small")
    assert row["wilcoxon_p"] < 0.001 and not row["claimed"]
    assert "run-to-run variance was not measured, so no ranking is claimed" in \
        summary["headline"][0]
    assert any(line.startswith("How sure? 1 training run per model") for line in
               summary["headline"])


def test_no_winner_among_models_still_improving(tmp_path):
    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01]},
                  # big: +0.1 over the last quarter; small: one validation, nothing known
                  curves={"big": [0.3, 0.5, 0.6, 0.7], "small": [0.7]})
    summary = build_report(runs, tmp_path / "out")
    assert not _pair(summary, "big", "small")["claimed"]
    first = summary["headline"][0]
    assert "no winner is declared: big was still improving" in first
    big = next(r for r in summary["segmentation"] if r["model"] == "big")
    assert big["convergence"]["gain"] == pytest.approx(0.1)
    assert not math.isnan(big["run_spread"][1])
    # small validated once: the reader is told its convergence is unknown
    sure = next(line for line in summary["headline"] if line.startswith("How sure?"))
    assert "Whether small had stopped improving is not known" in sure


def test_claims_among_converged_models_are_named_while_the_winner_is_withheld(tmp_path):
    # slow still improving: no winner; big over small (both flat, runs agree) still holds
    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01], "slow": [0.02, 0.03]},
                  curves={"slow": [0.3, 0.5, 0.6, 0.7]})
    summary = build_report(runs, tmp_path / "out")
    first = summary["headline"][0]
    assert "no winner is declared: slow was still improving" in first
    assert _pair(summary, "big", "small")["claimed"]
    assert not _pair(summary, "big", "slow")["claimed"]
    gain = _pair(summary, "big", "small")["run_level"]["mean_difference"]
    assert gain == pytest.approx(0.04, abs=0.01)
    assert first.endswith("Shown among the models that had stopped improving: big above "
                          f"small ({gain:+.3f}).")


def test_the_scope_box_says_what_the_numbers_cover(tmp_path):
    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01]})
    summary = build_report(runs, tmp_path / "out")
    scope = " ".join(summary["scope"])
    assert "Data: handmade" in scope and "Runs: big 2, small 2" in scope
    # 400 samples against nnU-Net's 1000 x 250 steps x batch 2
    assert "big 400 (0.08 %)" in scope
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert markdown.index("## Scope") < markdown.index("## Verdicts") < markdown.index(
        "<details>")
    assert "Each model against the best (big)" in markdown


def test_the_first_screen_holds_the_scope_the_verdicts_and_a_figure(tmp_path):
    """As a reader opens it: headless Chromium at 1280 x 900 draws the scope box, the
    verdicts' box and a figure (many colours) before any scrolling."""
    from helpers import browser_screenshot

    runs = _store(tmp_path, {"big": [0.05, 0.04], "small": [0.0, 0.01]})
    build_report(runs, tmp_path / "out")
    shot = browser_screenshot(tmp_path / "out" / "report.html", "report_first_screen.png",
                              1280, 900)
    assert shot.shape[:2] == (900, 1280)
    for colour in ((0xf7, 0xf7, 0xf2), (0xf5, 0xf8, 0xff)):  # scope box, verdicts' box
        assert np.all(shot == colour, axis=-1).sum() > 5000, colour
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 300  # a figure, not only text


def _ensemble_scores(results, model, shift):
    table = results / "test" / model / "evaluation" / "cases.csv"
    table.parent.mkdir(parents=True)
    table.write_text("case_id,class,dice,hd95\n" + "".join(
        f"{case},a,{0.7 + shift + 0.01 * k},2.0\n" for k, case in enumerate(CASES)),
        encoding="utf-8")


def test_a_study_archived_in_parts_reports_as_one_store_would(tmp_path):
    # two parts on machines sharing no disk: each archives its store's runs and results
    # into one folder; the report built from the folder is the one of all runs together
    from medpipe.report.archive import archive_runs, archived_runs

    def on(host, runs):  # the machine each part's trainings ran on
        return [dataclasses.replace(r, tags={**r.tags, tracked.HOST: host}) for r in runs]

    part_a = on("CPU A, 2 threads, bf16", _store(tmp_path / "a", {"big": [0.05, 0.04]}))
    part_b = on("CPU B, 2 threads, fp32", _store(tmp_path / "b", {"small": [0.0, 0.01]}))
    for part, model, shift in (("a", "big", 0.1), ("b", "small", 0.0)):
        _ensemble_scores(tmp_path / part / "results", model, shift)
    archive = tmp_path / "archive"
    archive_runs(part_a, archive, tmp_path / "a" / "results")
    archive_runs(part_b, archive, tmp_path / "b" / "results")
    restored = archived_runs(archive)
    assert sorted(r.run_id for r in restored) == sorted(r.run_id for r in part_a + part_b)
    # what an earlier part's report wrote back onto its runs is that report's, not the run's:
    # archiving the runs again after it changes nothing
    reported = [dataclasses.replace(r, tags={**r.tags, tracked.COMPARISON_RUN: "report-1"},
                                    metrics={**r.metrics, tracked.REPORT_MEAN_DICE: 0.5,
                                             tracked.TRAINING_MINUTES: 3.0}) for r in part_a]
    before = {p: p.read_bytes() for p in archive.rglob("run.json")}
    archive_runs(reported, archive, tmp_path / "a" / "results")
    assert {p: p.read_bytes() for p in archive.rglob("run.json")} == before
    assert all(not tracked.REPORT_WRITEBACK & {*r.tags, *r.metrics}
               for r in archived_runs(archive))

    pooled = tmp_path / "pooled"  # what one machine running both parts would hold
    for part in ("a", "b"):
        shutil.copytree(tmp_path / part / "results", pooled, dirs_exist_ok=True)
    live = build_report(part_a + part_b, tmp_path / "live", results=pooled)
    result = subprocess.run([sys.executable, "-m", "medpipe.cli", "compare", "--runs",
                             str(archive), "-o", str(tmp_path / "rebuilt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rebuilt = json.loads((tmp_path / "rebuilt" / "summary.json").read_text(encoding="utf-8"))
    for key in ("segmentation_scope", "segmentation", "paired", "headline", "scope"):
        assert rebuilt[key] == json.loads(json.dumps(live[key])), key
    assert rebuilt["segmentation_scope"] == f"test set, n = {len(CASES)} cases"
    assert _pair(rebuilt, "big", "small")["claimed"]
    # costs from two machines: the scope says which and that times compare within one only
    assert ("Machines: the trainings' costs come from CPU A, 2 threads, bf16 (big); CPU B, "
            "2 threads, fp32 (small). Compare training times only within one machine."
            ) in rebuilt["scope"]
    assert not any(line.startswith("Machines") for line in
                   build_report(part_a, tmp_path / "one_machine")["scope"])
    # an archive holds no model and stays small: text tables and the runs' records
    assert sum(f.stat().st_size for f in archive.rglob("*") if f.is_file()) < 200_000


def test_a_broken_archive_is_named_in_one_line(tmp_path):
    from medpipe.errors import MedpipeError
    from medpipe.report.archive import archive_runs, archived_runs

    archive = tmp_path / "archive"
    written = archive_runs(_store(tmp_path, {"big": [0.05, 0.06]}), archive)
    # a part run twice: a second run of one training (its seed's) would count as two runs
    again = written[1].parent.with_name("a-later-run-id")
    shutil.copytree(written[1].parent, again)
    with pytest.raises(MedpipeError, match="two archived runs of one training") as error:
        archived_runs(archive)
    assert str(written[1]) in str(error.value) and str(again) in str(error.value)
    shutil.rmtree(again)
    # a table the run names but the archive lost
    (written[1].parent / "cases.csv").unlink()
    with pytest.raises(MedpipeError, match=r"archived run lacks its cases\.csv") as error:
        archived_runs(archive)
    assert str(written[1]) in str(error.value)
    shutil.rmtree(written[1].parent)

    written[0].write_text('{"run_id": "x"}', encoding="utf-8")
    compare = [sys.executable, "-m", "medpipe.cli", "compare", "-o", str(tmp_path / "out")]
    result = subprocess.run([*compare, "--runs", str(archive)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert str(written[0]) in result.stderr and "not an archived run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([*compare, "--runs", str(tmp_path / "empty")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "no archived runs" in result.stderr
    # a store's options beside --runs would be ignored: refused, not dropped
    result = subprocess.run([*compare, "--runs", str(archive), "--set", "seeds=[0]"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "from an archive alone" in result.stderr
    assert not (tmp_path / "out").exists()
