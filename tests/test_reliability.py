"""What a careless user or a hostile input does: refused in one line naming the file, with
nothing destroyed, nothing written outside the output, and no work lost to a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset, random_volume, tree_digest

from medpipe.data.layout import read_spec
from medpipe.device import pick_device
from medpipe.errors import DatasetError, ImageWriteError, MedpipeError
from medpipe.io import write_image
from medpipe.runs.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from medpipe.runs.lock import lock_run_folder, unlock_run_folder

CLI = [sys.executable, "-m", "medpipe.cli"]


def medpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


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
    from test_tracking import free_port

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

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            result = medpipe("sync-tracking", str(run))
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
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
        server.terminate()
        server.wait(timeout=30)
