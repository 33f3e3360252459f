"""`medpipe compare` from a real MLflow store: two segmentation models and two registration
methods trained/evaluated on the tiny brains; the paired statistics against scipy/numpy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import browser_dom, browser_screenshot, free_port, start_mlflow_server, stop_server
from mlflow import MlflowClient
from scipy.stats import wilcoxon

from medpipe.config import load_config
from medpipe.errors import MedpipeError
from medpipe.evaluation.registration import evaluate_registration
from medpipe.evaluation.segmentation import evaluate_segmentation
from medpipe.report.statistics import holm, paired_difference
from medpipe.training.segmentation import train_segmentation


def test_paired_difference_against_an_independent_computation():
    rng = np.random.default_rng(5)
    a = rng.uniform(0.7, 0.9, 12)
    b = a - rng.normal(0.03, 0.02, 12)
    stats = paired_difference(a, b)
    assert stats["n"] == 12
    assert stats["mean_difference"] == pytest.approx(np.mean(a - b))
    assert stats["wilcoxon_p"] == pytest.approx(wilcoxon(a - b).pvalue)
    assert stats["ci_low"] < stats["mean_difference"] < stats["ci_high"]
    assert stats["ci_low"] > 0  # a is clearly better here
    # the interval narrows around the mean with the standard error, roughly 2 x 1.96 x sem
    sem = np.std(a - b) / np.sqrt(12)
    assert stats["ci_high"] - stats["ci_low"] == pytest.approx(2 * 1.96 * sem, rel=0.3)
    # rank-biserial from the one-sided statistic W+ (no ties, no zeros): 2 W+ / T - 1
    w_plus = wilcoxon(a - b, alternative="greater").statistic
    assert stats["rank_biserial"] == pytest.approx(2 * w_plus / (12 * 13 / 2) - 1)
    assert stats["cohens_dz"] == pytest.approx(np.mean(a - b) / np.std(a - b, ddof=1))
    assert stats["wins"] + stats["losses"] == 12
    # too few cases for a bootstrap interval: none is given
    few = paired_difference(a[:5], b[:5])
    assert math.isnan(few["ci_low"]) and math.isnan(few["ci_high"])


def test_holm_against_a_hand_computation():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> kept monotone at 0.06
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def _the_runs_table_shows_the_comparison(uri: str, printed: str, tmp_path) -> None:
    """MLflow's own UI on the store, opened at the address `compare` printed, as a browser
    draws it: the model-training view, a row for every model and method, the report's Dice
    and training minutes as columns (test-artifacts/mlflow_runs.png)."""
    address = printed.split("http://127.0.0.1:5000/", 1)[1].split()[0]
    server = start_mlflow_server(free_port(), tmp_path / "ui", store=uri)
    try:
        page = f"{server.url}/{address}"
        dom = browser_dom(page)
        browser_screenshot(page, "mlflow_runs.png", 1800, 800, wait_ms=15000)
    finally:
        stop_server(server)
    for text in ("unet_fold_0", "nnunet_fold_0", "identity_fold_0", "classical_fold_0",
                 "report_mean_dice", "training_minutes", "Model training"):
        assert text in dom, text
    assert "comparison" in dom


def test_compare_builds_the_report_from_mlflow_runs(tiny_pipeline, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = [f"tracking.uri={uri}", "tracking.experiment=compare_test", "training.epochs=1",
                "training.iterations_per_epoch=2", "registration.atlas=brain_001",
                "registration.classical.demons_iterations=5"]
    config = load_config(tiny_pipeline / "config.yaml", settings)
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    for model in ("unet", "nnunet"):
        run_dir = train_segmentation(config, model, 0, tmp_path / model, progress=False)
        evaluate_segmentation(config, model, 0, run_dir, device="cpu")
    # logging a model leaves no store behind in the environment for later subprocesses
    assert os.environ.get("MLFLOW_TRACKING_URI") == environment
    for method in ("identity", "classical"):
        evaluate_registration(config, method, 0, tmp_path / method, device="cpu")
    # a training that diverges (a learning rate of 1e30) is named in the report, not compared
    diverging = load_config(tiny_pipeline / "config.yaml", [
        *settings, "training.optimizer.lr=1e30", "training.iterations_per_epoch=5"])
    with pytest.raises(MedpipeError, match="training diverged"):
        train_segmentation(diverging, "unet", 1, tmp_path / "unet_fold_1", progress=False)

    out = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, "-m", "medpipe.cli", "compare", "--experiment", "compare_test",
         "-o", str(out), "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for name in ("unet", "nnunet", "identity", "classical", "every pair over the same cases"):
        assert name in markdown
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "<table>" in page  # self-contained
    # as a reader sees it: Chromium draws it with its style (the headline's box, the
    # winner's row) and its figures (many colours), kept as test-artifacts/report.png
    shot = browser_screenshot(out / "report.html", "report.png")
    assert shot.shape[:2] == (2400, 1200)
    for colour in ((0xf5, 0xf8, 0xff), (0xee, 0xf7, 0xee)):  # headline box, winner's row
        assert np.all(shot == colour, axis=-1).sum() > 2000, colour
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # figures, not only text
    # one example figure per model, taken from its run's artifacts
    examples = sorted(p.name for p in out.glob("example_*.png"))
    assert examples == ["example_registration_classical.png",
                        "example_registration_identity.png",
                        "example_segmentation_nnunet.png", "example_segmentation_unet.png"]
    # registration's accuracy against speed, one point per method, in the report
    assert "Registration: Dice against seconds per pair" in markdown
    assert (out / "dice_versus_speed.png").stat().st_size > 0
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("compare_test")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    # the paired comparison carries each model's cost relative to the other's, from MLflow
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    (pair,) = summary["paired"]
    params = {r.data.tags["model"]: r.data.metrics["parameters"] for r in runs
              if r.data.tags.get("task") == "segmentation"}
    first, second = pair["a"], pair["b"]  # the better-scoring model first
    assert {first, second} == {"nnunet", "unet"}
    assert [row["model"] for row in summary["segmentation"]] == [first, second]
    assert summary["segmentation"][0]["winner"] and pair["mean_difference"] >= 0
    assert pair["parameters_ratio"] == pytest.approx(params[first] / params[second])
    # one run per model (one fold, one seed): the verdict ranks nothing, and says why
    verdict = summary["headline"][0]
    assert verdict.startswith(f"Which segmentation model? {first} scored highest")
    assert "run-to-run variance was not measured, so no ranking is claimed" in verdict
    assert verdict in markdown and not pair["claimed"]
    # registration scored on the fold's validation case (to the atlas), and said so
    assert summary["registration_scope"] == "validation pairs, n = 1"
    assert "Registration (validation pairs, n = 1)" in markdown
    # every model's budget is stated: both trained 1 epoch x 2 steps x their batch size
    budgets = summary["budgets"]["samples_seen"]
    batch = {r.data.tags["model"]: int(r.data.params["run.batch_size"]) for r in runs
             if r.data.tags.get("task") == "segmentation"}
    assert budgets == {m: pytest.approx(2 * batch[m]) for m in ("unet", "nnunet")}
    assert "### Budgets" in markdown and "## Verdicts" in markdown and "## Scope" in markdown
    (failed,) = summary["did_not_finish"]
    assert (failed["model"], failed["fold"], failed["status"]) == ("unet", "1", "FAILED")
    assert failed["reason"].startswith("training diverged: ")
    assert "Not compared: unet fold 1 did not finish" in markdown
    assert f"unet fold 1 (segmentation): FAILED after 0 epochs: {failed['reason']}" in markdown
    parents = [r for r in runs if r.data.tags.get("task") == "comparison"]
    assert len(parents) == 1
    # the compared runs point at the report's run, unnested (MLflow's table folds nested
    # runs away), each with its model's numbers in the report
    children = [r for r in runs if r.data.tags.get("comparison_run")
                == parents[0].info.run_id]
    assert len(children) == 4 and not any("mlflow.parentRunId" in r.data.tags for r in runs)
    rows = {row["model"]: row for task in ("segmentation", "registration")
            for row in summary[task]}
    for run in children:
        row = rows[run.data.tags["model"]]
        assert run.data.metrics["report_mean_dice"] == pytest.approx(row["mean_dice"][0])
        if run.data.tags["task"] == "segmentation":
            assert run.data.metrics["training_minutes"] == pytest.approx(
                row["training_s"] / 60)
    kind = client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # MLflow's model-training view, not GenAI's
    _the_runs_table_shows_the_comparison(uri, result.stdout, tmp_path)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= artifacts
    # every trained fold is a registered version; the comparison points `champion` at the
    # segmentation run with the best evaluated Dice, and that URI loads
    name = "medpipe-demo-brain-segmentation"
    versions = {v.tags.get("model") or client.get_run(v.run_id).data.tags["model"]: v
                for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"unet", "nnunet"}
    registered = client.get_registered_model(name)
    assert {"unet_fold_0", "nnunet_fold_0", "champion"} <= set(registered.aliases)
    scores = {r.data.tags["model"]: r.data.metrics["eval_mean_dice"] for r in runs
              if r.data.tags.get("task") == "segmentation"}
    winner = max(scores, key=scores.get)
    assert str(registered.aliases["champion"]) == str(versions[winner].version)
    assert f"models:/{name}@champion is {winner} fold 0" in result.stdout
    from medpipe import load_segmenter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert load_segmenter(f"models:/{name}@champion", device="cpu").spec.model == winner
