"""The Snakemake workflow, run for real on a small demo dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medpipe.data.demo import DemoSettings, build_demo_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *targets: str, cores: int = 2, **popen) -> list[str]:
    return [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--profile",
        str(REPO / "configs" / "profiles" / "local"),
        "--cores",
        str(cores),
        *targets,
    ]


@pytest.fixture
def workdir(tmp_path):
    build_demo_dataset(tmp_path / "raw", DemoSettings(cases=5, test_cases=0, spacing=6.0))
    (tmp_path / "config.yaml").write_text("dataset: raw\nresults: results\n")
    return tmp_path


def run(command: list[str]) -> subprocess.CompletedProcess:
    # the workflow's own store (RESULTS/mlflow.db), not one an earlier test left in the env
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    return subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", timeout=600, env=env
    )


def test_dry_run_shows_the_dag(workdir):
    result = run([*snakemake(workdir, "all"), "-n"])
    assert result.returncode == 0, result.stderr
    for rule in ("verify_dataset", "split_dataset", "extract_fingerprint", "plan_experiment"):
        assert rule in result.stdout
    assert re.search(r"preprocess_case\s+5\n", result.stdout)
    # the demo's config (one fold, three segmentation models, two networks, three baselines)
    command = snakemake(workdir, "all")
    command[command.index("--configfile") + 1] = str(REPO / "configs" / "demo.yaml")
    demo = run([*command, "--config", "dataset=raw", "results=results", "-n"])
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert re.search(r"train_segmentation\s+3\n", demo.stdout)
    assert re.search(r"train_registration\s+2\n", demo.stdout)
    assert re.search(r"evaluate_registration_baseline\s+3\n", demo.stdout)
    assert re.search(r"compare\s+1\n", demo.stdout)


def test_any_subset_of_models_plans_only_its_jobs(workdir):
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": "raw", "results": "results", "segmentation_models": ["unet"],
        "train_folds": [0], "registration": {"models": [], "baselines": []}}))
    test_images = workdir / "raw" / "imagesTs"
    test_images.mkdir()
    shutil.copy(next((workdir / "raw" / "imagesTr").iterdir()), test_images / "new_0000.nii.gz")
    seg = run([*snakemake(workdir, "all"), "-n"])
    assert seg.returncode == 0, seg.stderr[-2000:]
    assert re.search(r"train_segmentation\s+1\n", seg.stdout)
    assert re.search(r"predict_test_set\s+1\n", seg.stdout)  # the test images, predicted
    assert "evaluate_test_set" not in seg.stdout  # no labelsTs: nothing to score against
    (workdir / "raw" / "labelsTs").mkdir()
    shutil.copy(next((workdir / "raw" / "labelsTr").iterdir()),
                workdir / "raw" / "labelsTs" / "new.nii.gz")
    scored = run([*snakemake(workdir, "all"), "-n"])
    assert re.search(r"evaluate_test_set\s+1\n", scored.stdout), scored.stdout[-1500:]
    assert "registration" not in seg.stdout.split("Job stats:")[1].split("Reasons")[0]
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": "raw", "results": "results", "segmentation_models": [],
        "train_folds": [0], "registration": {"models": ["voxelmorph"],
                                             "baselines": ["identity"]}}))
    reg = run([*snakemake(workdir, "all"), "-n"])
    assert reg.returncode == 0, reg.stderr[-2000:]
    assert re.search(r"train_registration\s+1\n", reg.stdout)
    assert re.search(r"evaluate_registration_baseline\s+1\n", reg.stdout)
    assert "train_segmentation" not in reg.stdout


def test_seeds_repeat_runs_scored_on_the_test_cases_and_resenc_gets_its_plans(workdir):
    # repeated runs: one per seed of each segmentation model, each also scoring the
    # labelled test cases; a network with its own seeds; nnunet_resenc on ResEnc M plans
    for folder in ("imagesTs", "labelsTs"):
        (workdir / "raw" / folder).mkdir()
    for index, image in enumerate(sorted((workdir / "raw" / "imagesTr").iterdir())[:2]):
        case = image.name.removesuffix("_0000.nii.gz")
        shutil.copy(image, workdir / "raw" / "imagesTs" / f"test{index}_0000.nii.gz")
        shutil.copy(workdir / "raw" / "labelsTr" / f"{case}.nii.gz",
                    workdir / "raw" / "labelsTs" / f"test{index}.nii.gz")
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": "raw", "results": "results", "train_folds": [0], "seeds": [0, 2],
        "recipe": "native", "segmentation_models": ["unet", "nnunet_resenc"],
        "models": {"pyramid": {"seeds": [5]}},
        "registration": {"models": ["pyramid"], "baselines": []}}))
    dry = run([*snakemake(workdir, "all"), "-n", "-p"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert re.search(r"train_segmentation\s+4\n", dry.stdout)
    assert re.search(r"evaluate_segmentation_test\s+4\n", dry.stdout)
    assert re.search(r"train_registration\s+1\n", dry.stdout)
    assert re.search(r"plan_experiment_for_model\s+1\n", dry.stdout)
    commands = [line for line in dry.stdout.splitlines() if "medpipe " in line]
    seed_run = next(c for c in commands if "train-seg" in c and "runs/unet/seed_2/fold_0" in c)
    assert "--set models.unet.training.seed=2" in seed_run and "--fold 0" in seed_run
    first = next(c for c in commands if "train-seg" in c and "runs/unet/fold_0 " in c)
    assert "--set models.unet.training.seed=0" in first
    assert any("--cases test" in c and "runs/nnunet_resenc/seed_2/fold_0" in c
               for c in commands)
    assert any("train-reg" in c and "training.seed=5" in c and "runs/pyramid/fold_0 " in c
               for c in commands)
    assert any("--planner ResEncM" in c and "plans_ResEncM.json" in c for c in commands)
    # the fold ensemble predicting the test set is the first seed's folds
    assert re.search(r"predict_test_set\s+2\n", dry.stdout)


def test_the_workflow_knows_which_models_need_residual_plans():
    from medpipe.models import MODELS

    common = (REPO / "workflow" / "rules" / "common.smk").read_text(encoding="utf-8")
    listed = re.search(r"^RESIDUAL_MODELS = \{(.*)\}$", common, re.MULTILINE).group(1)
    assert {name.strip().strip('"') for name in listed.split(",")} == {
        name for name, spec in MODELS.items() if spec.needs_residual_plans}


def test_lint_is_clean_and_the_config_must_be_given(workdir):
    lint = run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory",
                str(workdir), "--configfile", str(workdir / "config.yaml"), "--lint"])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr
    bare = run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory",
                str(workdir), "-n"])
    assert bare.returncode != 0
    assert "--configfile" in bare.stdout + bare.stderr


def test_schema_rejects_a_bad_config_naming_the_setting(workdir):
    (workdir / "config.yaml").write_text("dataset: raw\nresults: results\nfolds: 1\n"
                                         "configuration: 2d\n")
    result = run([*snakemake(workdir, "all"), "-n"])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "configs/schema.yaml" in output or "schema" in output.lower()
    assert "'2d' is not one of ['3d_fullres', '3d_lowres']" in output or \
        "1 is less than the minimum of 2" in output, output[-2000:]
    assert not (workdir / "results").exists()  # nothing ran


def test_slurm_profiles_send_network_jobs_to_the_gpu_partition_or_none(workdir):
    command = snakemake(workdir, "all")
    command[command.index("--profile") + 1] = str(REPO / "configs" / "profiles" / "slurm")
    result = run([*command, "-n"])
    assert result.returncode == 0, result.stderr
    jobs = re.split(r"\n(?=rule )", re.sub(r"\n {4}", "\n", result.stdout))  # grouped: indented
    training = [j for j in jobs if j.startswith(("rule train_segmentation",
                                                 "rule train_registration"))]
    assert training, result.stdout[-2000:]
    for job in training:
        assert "gpu=1" in job and "slurm_partition=gpu" in job
    preprocessing = [j for j in jobs if j.startswith("rule preprocess_case")]
    assert preprocessing and all("gpu=" not in j and "slurm_partition" not in j
                                 for j in preprocessing)  # the cluster's default partition
    # the job count line of the DAG: 5 cases, all 3 segmentation models and 4 registration
    # methods on the 5 default folds
    assert re.search(r"train_segmentation\s+15\n", result.stdout)
    assert re.search(r"train_registration\s+10\n", result.stdout)
    assert all("--processes 1" in j for j in training)  # one GPU each: one process
    # four GPUs for segmentation training: four processes (DDP under torchrun)
    four = run([*command, "-n", "--set-resources", "train_segmentation:gpu=4"])
    assert re.search(r"medpipe train-seg .*--processes 4", four.stdout), four.stdout[-2000:]
    assert re.search(r"medpipe train-reg .*--processes 1", four.stdout)
    # a cluster without GPUs: no job asks for one
    command[command.index("--profile") + 1] = str(REPO / "configs" / "profiles" / "slurm-cpu")
    cpu = run([*command, "-n"])
    assert cpu.returncode == 0, cpu.stderr
    assert "rule train_segmentation" in cpu.stdout and "gpu=" not in cpu.stdout


def test_paths_with_shell_and_yaml_characters_reach_the_commands_whole(tmp_path):
    """Every `shell:` quotes what it interpolates: a dataset and results folder whose names
    hold a space, `;`, `$(...)`, `: ` and ` #` run the real jobs (verify to planning) with
    those exact folders, and nothing in the names is ever run as a command."""
    dataset = tmp_path / "my scans;touch INJECTED;true $(touch INJECTED2)"
    results = tmp_path / "results: #1 `touch INJECTED3`"
    build_demo_dataset(dataset, DemoSettings(cases=3, test_cases=0, spacing=6.0))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"dataset": str(dataset), "results": str(results), "folds": 2}))
    result = run(snakemake(tmp_path, "plan_experiment", cores=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (results / "plans.json").is_file() and (results / "verify.json").is_file()
    assert not list(tmp_path.rglob("INJECTED*")) and not list(Path.cwd().glob("INJECTED*"))


def test_killed_run_resumes_without_redoing_finished_cases(workdir):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = workdir / "results" / "preprocessed" / "3d_fullres"
    process = subprocess.Popen(
        snakemake(workdir, "preprocess_all", cores=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # a crash: no clean-up, no goodbye
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert 1 <= len(finished) < 5

    # a killed Snakemake leaves its lock behind; `--unlock` is the documented way on
    assert run([*snakemake(workdir, "preprocess_all"), "--unlock"]).returncode == 0
    result = run(snakemake(workdir, "preprocess_all"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("*.npz"))) == 5
    # the job in flight at the kill may have written its files before Snakemake saw it end;
    # Snakemake rightly redoes that one, and only that one
    redone = [n for n, mtime in finished.items() if (out / n).stat().st_mtime_ns != mtime]
    assert len(redone) <= 1, redone
    assert "preprocess_case" in result.stderr
    logs = list((workdir / "results" / "logs" / "preprocess_case" / "3d_fullres").glob("*.log"))
    assert len(logs) == 5


TINY_WORKFLOW = {
    "folds": 2,
    "segmentation_models": ["unet", "nnunet"],
    "train_folds": [0],
    "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "val_every": 1,
                 "num_workers": 0, "patch_size": [32, 32, 32], "augment": False},
    "models": {"unet": {"options": {"channels": [8, 16, 32], "strides": [2, 2],
                                    "num_res_units": 1}}},
    "registration": {"models": ["voxelmorph"], "eval_pairs": 2,
                     "classical": {"demons_iterations": 5}},
    "tracking": {"experiment": "workflow_test"},  # the default store: RESULTS/mlflow.db
}


def test_whole_workflow_end_to_end_killed_during_training_and_resumed(workdir):
    """`all` on 5 tiny brains: killed (SIGKILL) while the second model trains, unlocked, run
    again: it completes, the finished training is not redone, and the comparison report
    and `snakemake --report` exist with every model in them."""
    config = {"dataset": "raw", "results": "results", **TINY_WORKFLOW}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    runs = workdir / "results" / "runs"
    logs = workdir / "results" / "logs"
    first_log = workdir / "first_run.log"
    process = subprocess.Popen(snakemake(workdir, "all", cores=1), stdout=subprocess.DEVNULL,
                               stderr=first_log.open("w"), env=env, start_new_session=True,
                               cwd=workdir)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        trained = list(runs.glob("*/fold_0/training.json"))
        training_logs = list(logs.glob("train_*/*.log"))
        if trained and len(training_logs) > len(trained):  # a finished one, another going
            break
        time.sleep(0.2)
    log = first_log.read_text(encoding="utf-8", errors="replace")[-3000:]
    assert process.poll() is None, f"the workflow ended before it could be interrupted:\n{log}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/fold_0/training.json")}
    assert finished

    assert run([*snakemake(workdir, "all"), "--unlock"]).returncode == 0
    result = run(snakemake(workdir, "all"))
    assert result.returncode == 0, result.stderr[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"
    report = (workdir / "results" / "compare" / "report.md").read_text(encoding="utf-8")
    for method in ("unet", "nnunet", "voxelmorph", "identity", "classical"):
        assert re.search(rf"\| (★ )?{method} \|", report), method
    html = run([*snakemake(workdir, "all"), "--report", str(workdir / "workflow.html")])
    assert html.returncode == 0, html.stderr[-3000:]
    page = (workdir / "workflow.html").read_text(encoding="utf-8", errors="replace")
    assert "report.html" in page and "Comparison" in page
    # the store and its artifacts belong to the results, none in the working directory
    assert (workdir / "results" / "mlflow.db").is_file()
    assert list((workdir / "results" / "mlruns").rglob("best.pt"))
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    # the study's record (bench/study_record.py) reads such a finished results folder back;
    # its archive holds this study's runs alone, whatever an earlier record left there
    stale = workdir / "record" / "runs" / "tracked" / "an-earlier-study's-run"
    stale.mkdir(parents=True)
    (stale / "run.json").write_text("{}")
    record = run([sys.executable, str(REPO / "bench" / "study_record.py"),
                  str(workdir / "results"), str(workdir / "record")])
    assert record.returncode == 0, record.stderr[-3000:]
    summary = json.loads((workdir / "record" / "mlflow_summary.json").read_text())
    assert summary["targets"] and (workdir / "record" / "report.md").is_file()
    # ... and archives its runs (no models): the report rebuilt from the archive alone, on
    # another machine say, records the same scores, runs and job minutes
    archive = workdir / "record" / "runs"
    assert len(list(archive.glob("tracked/*/run.json"))) == len(summary["runs"])
    assert not stale.exists()
    assert not list(archive.rglob("*.pt"))
    rebuilt = run([sys.executable, "-m", "medpipe.cli", "compare", "--runs", str(archive),
                   "-o", str(workdir / "rebuilt")])
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    again = run([sys.executable, str(REPO / "bench" / "study_record.py"), "--archive",
                 str(archive), "--report", str(workdir / "rebuilt"), str(workdir / "again")])
    assert again.returncode == 0, again.stderr[-3000:]
    restated = json.loads((workdir / "again" / "mlflow_summary.json").read_text())
    assert restated["scores"] == pytest.approx(summary["scores"])
    assert restated["runs"] == summary["runs"]
    assert restated["hosts"] == summary["hosts"] and summary["hosts"]  # jobs of 1 or 2 threads
    assert restated["job_minutes"] == summary["job_minutes"] > 0

    # a changed setting of one model reruns that model's training and what follows, only
    config["models"]["unet"]["training"] = {"epochs": 3}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    dry = run([*snakemake(workdir, "all"), "-n"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert re.search(r"train_segmentation\s+1\n", dry.stdout), dry.stdout[-2000:]
    assert re.search(r"output: \S*runs/unet/fold_0/training\.json", dry.stdout)
    assert not re.search(r"output: \S*runs/nnunet/fold_0/training\.json", dry.stdout)
    assert "train_registration" not in dry.stdout
    # a seed added to a model trains that seed's run only, not the one it had
    config["models"].setdefault("nnunet", {})["seeds"] = [0, 7]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    seeded = run([*snakemake(workdir, "all"), "-n"])
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    assert re.search(r"output: \S*runs/nnunet/seed_7/fold_0/training\.json", seeded.stdout)
    assert not re.search(r"output: \S*runs/nnunet/fold_0/training\.json", seeded.stdout)
