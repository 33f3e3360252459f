"""What a careless user or a hostile input does: refused in one line naming the file, with
nothing destroyed, nothing written outside the output, and no work lost to a kill."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    free_port,
    make_dataset,
    random_volume,
    start_mlflow_server,
    stop_server,
    tree_digest,
)

from medpipe.data.layout import read_spec
from medpipe.device import pick_device
from medpipe.errors import DatasetError, ImageWriteError, MedpipeError
from medpipe.io import write_image
from medpipe.runs.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from medpipe.runs.lock import lock_run_folder, unlock_run_folder

CLI = [sys.executable, "-m", "medpipe.cli"]


def medpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # UTF-8 whatever the locale: MLflow prints emoji when a run ends
    return subprocess.run([*CLI, *args], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=300, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A refusal as the CLI must give it: non-zero, one line, no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- paths that leave a folder

@pytest.mark.parametrize("ending", ["/../../../../tmp/x.nii.gz", ".png", "nii.gz", ""])
def test_a_file_ending_outside_the_known_formats_is_refused(tmp_path, ending):
    root = make_dataset(tmp_path / "raw", n_cases=2)
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "file_ending": ending}))
    with pytest.raises(DatasetError, match=r"file_ending: .*must be one of \.nii\.gz"):
        read_spec(root)
    before = tree_digest(root)
    verify = medpipe("verify", str(root))  # lists every problem, then fails
    assert verify.returncode != 0 and "file_ending" in verify.stdout
    one_line_error(medpipe("fingerprint", str(root), "-o", str(tmp_path / "fp.json")),
                   "dataset.json", "file_ending")
    assert tree_digest(root) == before and not (tmp_path / "fp.json").exists()


# ---------------------------------------------------------------- outputs

def test_an_unknown_output_suffix_is_an_error_not_a_dicom_folder(tmp_path):
    with pytest.raises(ImageWriteError, match=r"unknown image format '.png'"):
        write_image(random_volume(), tmp_path / "seg.png")
    assert not list(tmp_path.iterdir())
    write_image(random_volume(dtype=np.int16), tmp_path / "series")  # no suffix: DICOM
    assert len(list((tmp_path / "series").glob("*.dcm"))) == 7  # slices along k


def test_an_unknown_device_is_one_line(tmp_path):
    with pytest.raises(MedpipeError, match="unknown device 'tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedpipeError, match="sees no CUDA device"):
            pick_device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")


def test_os_errors_reach_the_user_as_one_line(tmp_path):
    """A write the system refuses (here: an output folder that is a file) is one line."""
    root = make_dataset(tmp_path / "raw", n_cases=2)
    (tmp_path / "taken").write_text("a file where a folder must go")
    result = medpipe("fingerprint", str(root), "-o", str(tmp_path / "taken" / "fp.json"))
    one_line_error(result, "taken")


# ---------------------------------------------------------------- checkpoints

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from medpipe.runs.checkpoint import save_checkpoint
    folder, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    save_checkpoint(folder, "latest", {"marker": torch.tensor(1)}, {"marker": 1})
    real, calls = os.replace, [0]
    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    os.replace = replace
    save_checkpoint(folder, "latest", {"marker": torch.tensor(2)}, {"marker": 2})
""")


@pytest.mark.parametrize(("kill_at", "survivor"), [(1, 1), (2, 1), (3, 1), (4, 2), (99, 2)])
def test_a_checkpoint_survives_a_kill_at_any_instant_of_its_write(tmp_path, kill_at,
                                                                  survivor):
    """The four renames of a checkpoint write (new weights, new JSON, switch weights, switch
    JSON): killed before any of them, the folder still holds one whole checkpoint, old or
    new, and the next write cleans up after the killed one."""
    folder = tmp_path / "checkpoints"
    subprocess.run([sys.executable, "-c", KILLER, str(folder), str(kill_at)], timeout=120)
    assert checkpoint_exists(folder, "latest")
    state, meta = load_checkpoint(folder, "latest")
    assert int(state["marker"]) == meta["marker"] == survivor
    save_checkpoint(folder, "latest", {"marker": torch.tensor(3)}, {"marker": 3})
    state, meta = load_checkpoint(folder, "latest")
    assert int(state["marker"]) == meta["marker"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "latest.pt"]


def test_unreadable_checkpoints_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, "best", {"w": torch.zeros(2)}, {"epoch": 1})
    (folder / "best.pt").write_bytes(b"")
    with pytest.raises(MedpipeError, match=r"empty \(0 bytes\)"):
        load_checkpoint(folder, "best")

    class Hostile:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"w": Hostile()}, folder / "best.pt")
    with pytest.raises(MedpipeError, match="never unpickles code") as raised:
        load_checkpoint(folder, "best")
    assert "weights_only=False" not in str(raised.value)
    assert not Path("PWNED").exists()
    # a plain pickle (protocol 4, not torch.save's 2): one line, no torch notice beside it
    (folder / "best.pt").write_bytes(pickle.dumps(Hostile(), protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MedpipeError, match="never unpickles code"):
            load_checkpoint(folder, "best")
    assert not Path("PWNED").exists()
    (folder / "best.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(MedpipeError, match="cannot read checkpoint"):
        load_checkpoint(folder, "best")


# ---------------------------------------------------------------- one trainer per folder

def test_a_second_trainer_on_a_locked_run_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom medpipe.runs.lock import "
         "lock_run_folder\nlock_run_folder(sys.argv[1])\nprint('locked', flush=True)\n"
         "time.sleep(60)", str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MedpipeError, match=f"in use by pid {holder.pid} on "):
            lock_run_folder(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    lock_run_folder(tmp_path / "run")  # the holder's end released it: no stale lock
    lock_run_folder(tmp_path / "run")  # and it is re-entrant within one process
    unlock_run_folder(tmp_path / "run")


# ---------------------------------------------------------------- tracking

def test_training_goes_on_when_the_tracking_server_is_down_and_syncs_later(
        tiny_pipeline, tmp_path):
    """Nothing listens at the tracking URI for the whole training: the training ends
    normally, says so once, keeps every call in the run's journal, and `medpipe
    sync-tracking` sends them all to the server once it is up."""
    from medpipe.config import load_config
    from medpipe.training.segmentation import train_segmentation

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = load_config(tiny_pipeline / "config.yaml", [
        f"tracking.uri={url}", "tracking.experiment=offline", "training.epochs=2",
        "training.iterations_per_epoch=2"])
    run = tmp_path / "run"
    start = time.monotonic()
    train_segmentation(config, "unet", 0, run, restart=True, progress=False)
    assert time.monotonic() - start < 120  # no minutes of HTTP retries
    journal = run / "tracking_pending.jsonl"
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
    assert ops.count("log_metrics") == 3 and "log_params" in ops and ops[-1] == "finish"
    assert (run / "training.json").is_file()

    server = start_mlflow_server(port, tmp_path)
    try:
        result = medpipe("sync-tracking", str(run))
        assert result.returncode == 0, result.stderr
        assert not journal.exists()
        from mlflow import MlflowClient

        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("offline").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        history = client.get_metric_history(runs[0].info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]
        assert runs[0].data.params["run.model"] == "unet"
    finally:
        stop_server(server)


# ---------------------------------------------------------------- inputs, where they enter

def broken_case(root: Path, change) -> Path:
    """A copy of a valid dataset whose case_000 was changed by CHANGE(image, label)."""
    from medpipe.io import read_image

    image_file = root / "imagesTr" / "case_000_0000.nii.gz"
    label_file = root / "labelsTr" / "case_000.nii.gz"
    image, label = read_image(image_file), read_image(label_file)
    new_image, new_label = change(image, label)
    if new_image is not None:
        write_image(new_image, image_file)
    if new_label is not None:
        write_image(new_label, label_file)
    return root


def nan_image(image, label):
    array = image.array.copy()
    array[1, 1, 1] = np.nan
    return image.with_array(array), None


def other_shape_label(image, label):
    from medpipe.io import Volume

    return None, Volume(np.zeros((12, 9, 8), np.uint8), label.geometry)


def undeclared_label(image, label):
    array = label.array.copy()
    array[0, 0, 0] = 7
    return None, label.with_array(array)


def fractional_label(image, label):
    return None, label.with_array(label.array.astype(np.float32) * 0.5)


@pytest.mark.parametrize(("change", "message", "culprit"), [
    (nan_image, "not finite", "imagesTr"),
    (other_shape_label, "shape (12, 9, 8) differs", "labelsTr"),
    (undeclared_label, "label value(s) 7 (1 voxels) not declared", "labelsTr"),
    (fractional_label, "non-integer", "labelsTr"),
])
def test_fingerprint_and_preprocess_refuse_a_broken_case_naming_its_file(
        tmp_path, change, message, culprit):
    from medpipe.planning import fingerprint_dataset
    from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset

    root = broken_case(make_dataset(tmp_path / "raw", n_cases=3), change)
    before = tree_digest(root)
    with pytest.raises(DatasetError, match=re.escape(message)) as raised:
        fingerprint_dataset(root)
    assert culprit in str(raised.value.path) and "case_000" in str(raised.value.path)
    from medpipe.data import load_dataset

    plan = PreprocessingPlan(spacing=(1.0, 1.0, 1.0), normalization_schemes=(
        "ZScoreNormalization",), use_mask_for_norm=(False,), intensity_properties={})
    with pytest.raises(DatasetError, match=re.escape(message)):
        preprocess_dataset(load_dataset(root).training[:1], plan, tmp_path / "pre", [1, 2])
    assert not list((tmp_path / "pre").glob("case_000.*"))
    assert tree_digest(root) == before  # raw data is only read


def test_non_consecutive_labels_are_refused_in_dataset_json(tmp_path):
    root = make_dataset(tmp_path / "raw", n_cases=2)
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "one": 1, "five": 5}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=r"consecutive 0\.\.2, got \[0, 1, 5\]"):
        read_spec(root)


def test_a_huge_intensity_scale_is_normalised_like_the_original():
    """z-scores are scale-free: an image x1e30 must normalise to the same values, not to
    zeros (float32 squares overflow beyond ~1e19)."""
    from medpipe.preprocessing import normalise

    image = np.random.default_rng(0).normal(100, 30, (1, 12, 11, 10)).astype(np.float32)
    mask = np.ones(image.shape[1:], bool)
    plain = normalise(image, mask, ["ZScoreNormalization"], [False], {})
    scaled = normalise(image * np.float32(1e30), mask, ["ZScoreNormalization"], [False], {})
    np.testing.assert_allclose(scaled, plain, atol=1e-5)


def test_predict_refuses_a_nan_scan_and_warns_on_an_empty_one(segmentation_run, tmp_path):
    from medpipe.io import read_image

    scans = sorted(Path(read_json_path(segmentation_run)).glob("*_0000.nii.gz"))
    scan = read_image(scans[0])
    array = scan.array.astype(np.float32)
    array[3, 3, 3] = np.inf
    write_image(scan.with_array(array), tmp_path / "inf.nii.gz")
    write_image(scan.with_array(np.zeros_like(array)), tmp_path / "zero.nii.gz")
    refused = medpipe("predict", "--model", str(segmentation_run), "-i",
                      str(tmp_path / "inf.nii.gz"), "-o", str(tmp_path / "inf_seg.nii.gz"))
    one_line_error(refused, "inf.nii.gz", "1 of", "NaN or infinite")
    assert not (tmp_path / "inf_seg.nii.gz").exists()
    empty = medpipe("predict", "--model", str(segmentation_run), "-i",
                    str(tmp_path / "zero.nii.gz"), "-o", str(tmp_path / "zero_seg.nii.gz"))
    assert empty.returncode == 0, empty.stderr
    warning = [line for line in empty.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "is constant (every voxel 0)" in warning[0]


def read_json_path(run: Path) -> Path:
    """The raw training images of the dataset RUN was trained on."""
    config = json.loads((Path(run) / "config.json").read_text())
    return Path(config["dataset"]) / "imagesTr"


def test_a_batch_that_cannot_fit_is_refused_before_the_run_folder_is_touched(
        tiny_pipeline, tmp_path):
    from medpipe.config import load_config
    from medpipe.training.segmentation import train_segmentation

    config = load_config(tiny_pipeline / "config.yaml", [
        "tracking.enabled=false", "training.batch_size=100000"])
    with pytest.raises(MedpipeError, match=r"training batch of 100000 x .* needs at least"):
        train_segmentation(config, "unet", 0, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.json").exists()


def test_a_broken_fingerprint_is_refused_naming_the_file(tmp_path):
    from medpipe.planning import read_fingerprint

    path = tmp_path / "fingerprint.json"
    path.write_text("{not json")
    with pytest.raises(MedpipeError, match="cannot read fingerprint"):
        read_fingerprint(path)
    path.write_text(json.dumps({"cases": []}))
    with pytest.raises(MedpipeError, match="missing dataset_json"):
        read_fingerprint(path)
    one_line_error(medpipe("plan", str(path), "-o", str(tmp_path / "plans.json")),
                   "fingerprint.json", "missing dataset_json")


def test_staging_folders_a_killed_writer_left_are_cleaned_by_the_next_write(tmp_path):
    from medpipe.io import write_json

    stale, fresh = tmp_path / ".out.json.killed1", tmp_path / ".out.json.running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    write_json({"a": 1}, tmp_path / "out.json")
    assert not stale.exists() and fresh.exists()  # a writer may still fill the fresh one


def test_register_refuses_a_constant_or_nan_scan(registration_run, tmp_path):
    from medpipe.io import read_image

    run = registration_run
    fixed = sorted(read_json_path(run).glob("*_0000.nii.gz"))[0]
    scan = read_image(fixed)
    write_image(scan.with_array(np.zeros(scan.shape, np.float32)), tmp_path / "zero.nii.gz")
    array = scan.array.astype(np.float32)
    array[0, 0, 0] = np.nan
    write_image(scan.with_array(array), tmp_path / "nan.nii.gz")
    for moving, message in (("zero.nii.gz", "the moving scan is constant"),
                            ("nan.nii.gz", "NaN or infinite")):
        result = medpipe("register", "--model", str(run), "--moving", str(tmp_path / moving),
                         "--fixed", str(fixed), "-o", str(tmp_path / "out"))
        one_line_error(result, message, moving)
        assert not (tmp_path / "out").exists()


def test_a_scan_with_a_singular_direction_matrix_is_refused_naming_it(tmp_path):
    import nibabel as nib

    from medpipe.errors import ImageReadError
    from medpipe.io import read_image

    affine = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), tmp_path / "flat.nii.gz")
    with pytest.raises(ImageReadError, match="singular direction matrix") as raised:
        read_image(tmp_path / "flat.nii.gz")
    assert raised.value.path == tmp_path / "flat.nii.gz"


def test_a_model_whose_own_files_hold_an_impossible_patch_or_spacing_is_refused(
        segmentation_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(segmentation_run, run)
    plans = json.loads((run / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"][1] = 0.0
    (run / "plans.json").write_text(json.dumps(plans))
    scan = sorted(read_json_path(run).glob("*_0000.nii.gz"))[0]
    one_line_error(medpipe("predict", "--model", str(run), "-i", str(scan), "-o",
                           str(tmp_path / "seg.nii.gz")), "plans.json", "spacing",
                   "greater than 0")
    spec = json.loads((run / "model.json").read_text())
    spec["patch_size"] = [0, 32, 32]
    (run / "model.json").write_text(json.dumps(spec))
    one_line_error(medpipe("predict", "--model", str(run), "-i", str(scan), "-o",
                           str(tmp_path / "seg.nii.gz")), "model.json", "patch_size")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_a_tracking_server_that_dies_mid_run_loses_nothing(tmp_path):
    """Epoch 1 logged, the server killed, epochs 2-3 logged while it is away (one report,
    no exception, no stall), the server back on the same store: the next call sends the
    waiting ones first, and the run's history has every epoch in order."""
    from mlflow import MlflowClient

    from medpipe.config import TrackingConfig
    from medpipe.runs.folder import RunFolder
    from medpipe.tracking import open_tracker

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = TrackingConfig(uri=url, experiment="outage").store(tmp_path)
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    server = start_mlflow_server(port, tmp_path)
    reports: list[str] = []
    tracker = open_tracker(store, "demo", "unet_fold_0", folder)
    tracker._report = reports.append  # what the user would read on stderr
    tracker.retry_seconds = 0.0
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    stop_server(server, signal.SIGKILL)  # gone, no goodbye
    start = time.monotonic()
    tracker.log_metrics({"train_loss": 0.8}, step=2)
    tracker.log_metrics({"train_loss": 0.7}, step=3)
    assert time.monotonic() - start < 30 and tracker.pending == 2
    assert len(reports) == 1 and "the store failed" in reports[0]
    server = start_mlflow_server(port, tmp_path)
    try:
        tracker.log_metrics({"train_loss": 0.6}, step=4)
        tracker.finish()
        assert tracker.pending == 0 and not folder.tracking_journal.exists()
        history = MlflowClient(url).get_metric_history(tracker.run_id, "train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (1, 1.0), (2, 0.8), (3, 0.7), (4, 0.6)]
        assert MlflowClient(url).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop_server(server)
