"""The prepared GPU check runs end to end on this CPU where SimpleITK and MLflow cannot be
imported (the GPU machine has neither): real training steps, bf16 and fp16, a sliding-window
prediction, every figure of its JSON present."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a meta-path finder that refuses the packages the GPU machine lacks, then the script
WITHOUT = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"SimpleITK", "mlflow"}:
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_gpu_check_runs_without_simpleitk_or_mlflow(tiny_pipeline, tmp_path):
    from conftest import TINY_FEATURES

    from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans

    # what `--prepare` writes for nnunet_resenc (here with the tiny features)
    resenc = plan_experiment(fingerprint_dataset(tiny_pipeline / "raw"), planner="ResEncM")
    stages = resenc.configuration("3d_fullres").architecture.arch_kwargs.n_stages
    write_plans(resenc.with_features("3d_fullres", tuple(TINY_FEATURES[:stages])),
                tiny_pipeline / "results" / "plans_ResEncM.json")
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT, str(ROOT / "bench" / "gpu_check.py"), "--device",
         "cpu", "--iterations", "2", "--data", str(tiny_pipeline), "--out", str(out),
         "--models", "unet:bf16:device", "nnunet:fp16", "nnunet_resenc"],
        capture_output=True, cwd=ROOT, timeout=600)
    log = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 0, log[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["amp_dtype"], r["augment_on"]) for r in rows] == [
        ("unet", "bfloat16", "device"), ("nnunet", "float16", "loader"),
        ("nnunet_resenc", "bfloat16", "loader")]
    for row in rows:
        assert row["seconds_per_iteration"] > 0 and row["samples_per_second"] > 0
        assert 0 <= row["data_wait_share"] < 1
        assert row["inference_seconds"] > 0 and row["loader_workers"] == 1
        assert row["peak_gpu_memory_mb"] is None and row["gpu_utilisation_percent"] is None


def test_loader_workers_follow_the_device_and_the_cpu_count(monkeypatch):
    import os

    import torch

    from medpipe.device import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    assert loader_workers(None, torch.device("cuda")) == 12  # nnU-Net's default, at most
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)))
    assert loader_workers(None, torch.device("cuda")) == 4  # the cores less two
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert loader_workers(None, torch.device("cuda")) == 1
    assert loader_workers(None, torch.device("cpu")) == 1  # the cores are the network's
    assert loader_workers(3, torch.device("cpu")) == 3  # a setting is kept
