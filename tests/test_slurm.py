"""The workflow on a real SLURM (tests/slurm/cluster.sh start): every job through sbatch,
tracked by a real `mlflow server` on loopback, and a training job cancelled with `scancel`
half-way that resumes from its checkpoint when the workflow is run again.

Skipped where no SLURM answers, unless MEDPIPE_REQUIRE_SLURM=1 (CI: `.ci/run` starts the
cluster), where that is a failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port, start_mlflow_server, stop_server
from mlflow import MlflowClient

from medpipe.data.demo import DemoSettings, build_demo_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts"
# what README's cluster section tells a user of a cluster like this one (no accounts, no
# accounting database, no GPUs) to add to the profile
CLUSTER_OPTIONS = ["--profile", str(REPO / "configs" / "profiles" / "slurm-cpu"),
                   "--slurm-no-account", "--slurm-status-command", "squeue",
                   "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5",
                   "--retries", "0", "--jobs", "4"]
CONFIG = {
    "dataset": "raw", "results": "results", "folds": 2,
    "segmentation_models": ["unet"], "train_folds": [0],
    "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "val_every": 1,
                 "num_workers": 0, "patch_size": [32, 32, 32], "augment": False},
    # unet's training runs long enough to be cancelled between two epochs
    "models": {"unet": {"options": {"channels": [8, 16, 32], "strides": [2, 2],
                                    "num_res_units": 1},
                        "training": {"epochs": 6, "iterations_per_epoch": 12}}},
    "registration": {"models": ["voxelmorph"], "baselines": ["identity", "classical"],
                     "eval_pairs": 2, "classical": {"demons_iterations": 5},
                     "instance_optimisation": {"steps": 0}},
    "tracking": {"experiment": "slurm_test"},
}


def slurm_node_state() -> str | None:
    if not shutil.which("sinfo"):
        return None
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return result.stdout.split()[0] if result.returncode == 0 and result.stdout.split() \
        else None


@pytest.fixture(scope="module")
def cluster():
    state = slurm_node_state()
    if state not in ("idle", "mixed", "allocated"):
        message = (f"no idle SLURM node here (sinfo: {state}); start one with "
                   "tests/slurm/cluster.sh start")
        if os.environ.get("MEDPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def scheduler_record(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """SLURM's own record of JOB_IDS: id -> (state, comment naming the rule). Finished jobs
    stay in it for MinJobAge (10 minutes in tests/slurm/cluster.sh)."""
    result = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids),
                             "-o", "%i|%T|%k"], capture_output=True, text=True, check=True)
    rows = [line.split("|", 2) for line in result.stdout.splitlines() if line.strip()]
    return {job: (state, comment) for job, state, comment in rows}


def submitted(log: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", log)


def test_workflow_runs_on_slurm_and_a_cancelled_training_resumes(cluster, tmp_path):
    build_demo_dataset(tmp_path / "raw", DemoSettings(cases=5, test_cases=0, spacing=6.0))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    server = start_mlflow_server(free_port(), tmp_path / "mlflow")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": server.url}  # sbatch hands the environment to each job
    command = [str(BIN / "snakemake"), "all", "-s", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), *CLUSTER_OPTIONS]
    try:
        # first run: scancel the unet's training job once it has checkpointed an epoch
        first_log = tmp_path / "first.log"
        with first_log.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=tmp_path)
        run_dir = tmp_path / "results" / "runs" / "unet" / "fold_0"
        cancelled = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and process.poll() is None and cancelled is None:
            if (run_dir / "checkpoints" / "latest.pt").exists():
                queue = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True,
                                       text=True).stdout
                for line in queue.splitlines():
                    job, comment = line.split("|", 1)
                    if "train_segmentation" in comment:
                        subprocess.run(["scancel", job], check=True)
                        cancelled = job
            time.sleep(0.5)
        first = first_log.read_text(encoding="utf-8", errors="replace")
        assert cancelled, f"the unet's training was not caught running:\n{first[-3000:]}"
        assert process.wait(timeout=900) != 0, first[-3000:]  # the workflow saw it fail
        assert not (run_dir / "training.json").exists()
        record = scheduler_record([cancelled])
        assert record[cancelled][0] == "CANCELLED", record

        # second run: the rest, the cancelled training resumed from its checkpoint
        second_log = tmp_path / "second.log"
        with second_log.open("w") as out:
            second = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp_path, timeout=1800)
        log = second_log.read_text(encoding="utf-8", errors="replace")
        assert second.returncode == 0, log[-3000:]
        training_log = (tmp_path / "results" / "logs" / "train_segmentation" /
                        "unet_fold_0.log").read_text(encoding="utf-8")
        assert re.search(r"unet fold 0: resuming after epoch [1-5]\b", training_log)
        assert "epoch 6/6" in training_log

        # every job went through sbatch, as SLURM itself records: all finished there
        jobs = submitted(first) + submitted(log)
        steps = re.findall(r"(\d+) of (\d+) steps \(100%\) done", log)
        record = scheduler_record(jobs)
        line = f"SLURM ran {len(jobs)} jobs (1 cancelled and rerun): " + ", ".join(
            sorted({re.sub(r"^rule_|_wildcards.*$", "", c) for _, c in record.values()}))
        ARTIFACTS.mkdir(exist_ok=True)  # .ci/run prints it into the CI log
        (ARTIFACTS / "slurm_jobs.txt").write_text(line + "\n", encoding="utf-8")
        assert set(record) == set(jobs)
        assert [state for job, (state, _) in record.items() if job != cancelled] == \
            ["COMPLETED"] * (len(jobs) - 1)
        ran = {rule for _, comment in record.values()
               for rule in re.findall(r"rule_([a-z_]+?)(?:_wildcards|$)", comment)}
        assert {"verify_dataset", "plan_experiment", "train_segmentation",
                "evaluate_segmentation", "train_registration", "evaluate_registration_network",
                "evaluate_registration_baseline", "compare"} <= ran, ran
        assert steps, log[-2000:]
        report = (tmp_path / "results" / "compare" / "report.md").read_text(encoding="utf-8")
        for method in ("unet", "voxelmorph", "identity", "classical"):
            assert re.search(rf"\| (★ )?{method} \|", report), method

        # the jobs logged to the server, not to a file beside the results
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("slurm_test")
        runs = client.search_runs([experiment.experiment_id])
        tasks = {(r.data.tags.get("task"), r.data.tags.get("model")) for r in runs}
        assert {("segmentation", "unet"), ("registration", "voxelmorph"),
                ("registration", "identity"), ("comparison", None)} <= tasks, tasks
        assert not (tmp_path / "results" / "mlflow.db").exists()
    finally:  # none of this test's jobs outlives it
        logs = [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
        ours = [job for text in logs for job in submitted(text)]
        if ours:
            subprocess.run(["scancel", *ours], capture_output=True)
        stop_server(server)
