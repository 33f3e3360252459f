"""Training and evaluation logged to real MLflow stores, read back through MLflow's client:
a sqlite file, and a `mlflow server` process over HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from helpers import free_port, start_mlflow_server, stop_server
from mlflow import MlflowClient

from medpipe.config import load_config
from medpipe.evaluation.segmentation import evaluate_segmentation
from medpipe.training.segmentation import train_segmentation

EPOCHS = 2


def train_and_evaluate(root: Path, uri: str, run_dir: Path) -> str:
    config = load_config(root / "config.yaml", [
        f"tracking.uri={uri}", "tracking.experiment=tracked", f"training.epochs={EPOCHS}",
        "training.iterations_per_epoch=2",
    ])
    train_segmentation(config, "unet", 0, run_dir, restart=True, progress=False)
    evaluate_segmentation(config, "unet", 0, run_dir)
    return (run_dir / "mlflow_run.json").read_text()


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def check_run(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert params["run.model"] == "unet" and params["run.fold"] == "0"
    assert params["run.training.epochs"] == str(EPOCHS)
    assert params["run.training.optimizer.name"] == "adamw"
    assert params["plans.patch_size"].startswith("[")  # the plans' own values
    assert params["plans.normalization_schemes"] == '["ZScoreNormalization"]'
    for name in ("train_loss", "val_dice", "lr", "patches_per_s", "peak_memory_mb",
                 "val_dice_grey_matter", "eval_mean_dice", "eval_hd95_white_matter"):
        assert name in metrics, name
    assert len(client.get_metric_history(run_id, "train_loss")) == EPOCHS
    assert 0.0 <= metrics["eval_mean_dice"] <= 1.0
    assert tags["git_commit"] and tags["data_hash"] not in ("", "None")
    assert tags["device"] == "cpu" and tags["model"] == "unet"
    # the machine its costs come from: this CPU, its threads and the precision it ran in
    assert re.fullmatch(r".+, \d+ threads, (bf16|fp32)", tags["host"]), tags["host"]
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
    if " avx2" in flags:  # the vector unit that halves training times is named
        assert ("(AVX-512)" if " avx512f" in flags else "(AVX2)") in tags["host"], tags["host"]
    assert {
        "config.json", "plans.json", "model.json", "figures/learning_curve.png",
        "figures/validation_overlay.png", "evaluation/cases.csv", "evaluation/summary.json",
    } <= artifact_paths(client, run_id)


def test_sqlite_store_holds_params_metrics_tags_and_artifacts(tiny_pipeline, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_and_evaluate(tiny_pipeline, uri, tmp_path / "run")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    assert len(runs) == 1  # evaluation logged into the training run, not a new one
    check_run(MlflowClient(uri), runs[0].info.run_id)
    # the summary artifact is the file the evaluation wrote
    local = MlflowClient(uri).download_artifacts(runs[0].info.run_id, "evaluation/summary.json",
                                                 str(tmp_path / "download"))
    assert Path(local).read_text() == (tmp_path / "run/evaluation/summary.json").read_text()


@pytest.fixture
def mlflow_server(tmp_path):
    server = start_mlflow_server(free_port(), tmp_path)
    yield server.url, tmp_path / "artifacts"
    stop_server(server)


@pytest.mark.slow
def test_run_logged_over_http_to_a_real_mlflow_server(tiny_pipeline, tmp_path, mlflow_server):
    url, artifact_root = mlflow_server
    train_and_evaluate(tiny_pipeline, url, tmp_path / "run")
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    check_run(client, runs[0].info.run_id)
    # the server stored the files itself (proxied artifacts), not the client
    assert list(artifact_root.rglob("learning_curve.png"))
