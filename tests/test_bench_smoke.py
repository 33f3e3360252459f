"""Every benchmark script runs once at its tiniest size (a smoke test: nothing is timed or
compared), so a change that breaks a benchmark fails here, not in the next person's
`bench/run_all.py`.

Each script runs as its users run it, a subprocess of its own, with MEDPIPE_BENCH_SMOKE=1
(the scripts' smallest sizes), MEDPIPE_BENCH_DATA (a tiny prepared dataset instead of the
demo's brains) and its results and work folders in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NNUNET_PYTHON = Path(os.environ.get("MEDPIPE_NNUNET_BIN", ROOT / ".venv-nnunet" / "bin")) / "python"

# script -> its arguments ({data}, {runs}, {work}: the fixture's folders)
SMOKE_RUNS = {
    "autocast_cpu": ["--quick"],
    "data_loading": ["--quick", "--models", "unet", "nnunet_resenc", "voxelmorph"],
    "hostile_inputs": ["--model", "{runs}/unet/fold_0", "--reg-model",
                       "{runs}/voxelmorph/fold_0", "--only", "predict_nan",
                       "--out", "{work}/hostile_inputs.json"],
    "inference_grid": ["--model", "{runs}/unet/fold_0", "--scans", "{data}/raw/imagesTs",
                       "--out", "{work}/inference_grid.json"],
    "inference_speed": ["--quick", "--models", "unet"],
    "nnunet_reference": None,  # nnU-Net's own environment: its own test below
    "nnunet_training": [],  # runs nnunet_trainer_reference.py in nnU-Net's environment
    "onnx_inference": ["--runs", "{runs}", "--dataset", "{data}/raw", "--models", "unet",
                       "--scans", "1"],
    "preprocessing_scaling": ["--quick"],
    "registration_precision": ["--config", "{data}/config.yaml", "--runs",
                               "{runs}/voxelmorph/fold_0"],
    "registration_speed": ["--quick", "--only", "classical", "pyramid_io"],
    "registration_subjects": ["--config", "{data}/config.yaml", "--subjects", "2",
                              "--pairs", "1", "--budget", "2"],
    "resampling_speed": ["--quick"],
    "run_all": ["--quick", "--only", "preprocessing_scaling"],
    "training_throughput": ["--quick", "--models", "unet"],
}
# run by other tests, on what they build anyway
ELSEWHERE = {
    "common": "the library the scripts share",
    "gpu_check": "tests/test_gpu_check.py (on the tiny dataset, without SimpleITK and MLflow)",
    "nnunet_trainer_reference": "nnunet_training.py, above",
    "study_record": "tests/test_workflow.py (on a finished workflow's results)",
}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts == set(SMOKE_RUNS) | set(ELSEWHERE), (
        "add the new script to SMOKE_RUNS with its tiniest arguments")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A tiny dataset with two test brains, one-step unet and voxelmorph runs on it, and the
    environment that points the scripts at it."""
    from medpipe.config import load_config
    from medpipe.training.registration import train_registration
    from medpipe.training.segmentation import train_segmentation

    folder = tmp_path_factory.mktemp("bench_smoke")
    data = build_tiny_pipeline(folder / "data", {"enabled": False}, test_cases=2)
    settings = yaml.safe_load((data / "config.yaml").read_text())
    # one validation case per fold: registration validates on pairs with a training atlas
    settings["registration"] = {"atlas": "brain_001"}
    (data / "config.yaml").write_text(yaml.safe_dump(settings))
    runs = data / "runs"
    one_step = [f"training.{key}=1" for key in ("epochs", "iterations_per_epoch", "val_every")]
    config = load_config(data / "config.yaml", one_step)
    train_segmentation(config, "unet", 0, runs / "unet" / "fold_0", progress=False)
    train_registration(config, "voxelmorph", 0, runs / "voxelmorph" / "fold_0", progress=False)
    env = {**os.environ, "MEDPIPE_BENCH_SMOKE": "1", "MEDPIPE_BENCH_DATA": str(data),
           "MEDPIPE_BENCH_WORK": str(folder / "work"),
           "MEDPIPE_BENCH_RESULTS": str(folder / "results"), "PYTHONUNBUFFERED": "1"}
    return {"data": data, "runs": runs, "work": folder / "work", "results": folder / "results",
            "env": env}


@pytest.mark.parametrize("script", sorted(s for s, a in SMOKE_RUNS.items() if a is not None))
def test_the_benchmark_runs_at_its_tiniest_size(smoke, script):
    arguments = [a.format(data=smoke["data"], runs=smoke["runs"], work=smoke["work"])
                 for a in SMOKE_RUNS[script]]
    (smoke["work"]).mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *arguments],
                            capture_output=True, cwd=ROOT, env=smoke["env"], timeout=900)
    log = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 0, log[-4000:]
    written = {p.name for p in smoke["results"].glob("*.json")} | {
        p.name for p in smoke["work"].glob("*.json")}
    expected = "preprocessing_scaling" if script == "run_all" else script
    assert f"{expected}.json" in written, log[-2000:]


@pytest.mark.skipif(not NNUNET_PYTHON.is_file(), reason="nnU-Net's environment is missing")
def test_nnunets_own_predictor_runs_on_a_tiny_scan(smoke, tmp_path):
    scan = sorted((smoke["data"] / "raw" / "imagesTr").glob("*_0000.nii.gz"))[0]
    result = subprocess.run(
        [str(NNUNET_PYTHON), str(BENCH / "nnunet_reference.py"), "--dataset",
         str(smoke["data"] / "raw"), "--work", str(tmp_path), "--rows",
         json.dumps([[str(scan), False]]), "--features", "8,16,32,64"],
        capture_output=True, cwd=ROOT, timeout=900)
    log = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 0, log[-4000:]
    rows = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert rows[0]["seconds"] > 0
