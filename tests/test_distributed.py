"""Training on several processes (torch.distributed, DDP over gloo on the CPU): N processes
x batch b train exactly what 1 process x batch N*b trains, and a run killed mid-epoch resumes
to the weights an uninterrupted run reaches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medpipe.errors import MedpipeError
from medpipe.runs.checkpoint import checkpoint_exists, load_checkpoint
from medpipe.sampling import rank_batches

pytestmark = pytest.mark.slow
# a tiny VoxelMorph registering the tiny brains to an atlas: its loss (LNCC, diffusion, Dice
# of warped labels) is a mean over the batch's pairs and it has no normalisation layer, so a
# batch split over ranks has the same gradient as the whole batch. fp32 (amp off): bf16
# results depend on the batch's size through the kernels oneDNN picks for it.
SETTINGS = ["tracking.enabled=false", "registration.atlas=brain_001",
            "models.voxelmorph.options.channels=[8,16,16,16]",
            "models.voxelmorph.options.final_conv_channels=[8]",
            "training.batch_size=2", "training.epochs=3", "training.iterations_per_epoch=6",
            "training.val_every=1", "training.amp=false", "training.num_workers=0"]


def test_ranks_share_each_global_batch_in_order():
    one = rank_batches(3, 4)
    shares = [rank_batches(3, 4, rank, 2) for rank in range(2)]
    for step in range(3):
        assert shares[0][step] + shares[1][step] == one[step]
    with pytest.raises(MedpipeError, match="batch of 3 cannot be split evenly over 2"):
        rank_batches(3, 3, 0, 2)


def train(tiny_pipeline, run_dir, processes: int, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "medpipe.cli", "train-reg", "--config",
               str(tiny_pipeline / "config.yaml"), "--model", "voxelmorph", "--fold", "0",
               "--run-dir", str(run_dir), "--processes", str(processes)]
    for setting in SETTINGS:
        command += ["--set", setting]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    # UTF-8 whatever the locale: a killed run's output may hold torchrun's or MLflow's
    # non-ASCII characters (an ASCII locale failed to decode one here)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding="utf-8", errors="replace", start_new_session=True,
                            **popen)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    return output


def environment(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"\0" + f.read()
    except OSError:
        return b""


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def latest(run_dir):
    return load_checkpoint(run_dir / "checkpoints", "latest", torch.device("cpu"))


def test_two_processes_train_what_one_process_trains_and_resume_exactly(tiny_pipeline,
                                                                        tmp_path):
    finished(train(tiny_pipeline, tmp_path / "one", 1))
    two_output = finished(train(tiny_pipeline, tmp_path / "two", 2))
    assert two_output.count("trained voxelmorph fold 0") == 1  # rank 0 alone speaks
    one_state, one_meta = latest(tmp_path / "one")
    two_state, two_meta = latest(tmp_path / "two")
    # the same samples seen, the same losses and weights, but for the order of float32
    # sums (a batch's mean gradient against the mean of two ranks' ones): after 18 Adam
    # steps the weights (|w| up to 0.14) differed by 1.7e-6 at most, the losses by 1e-7
    # relative (measured once, 2026-12-04)
    assert [h["samples_seen"] for h in two_meta["history"]] == [12, 24, 36]
    for a, b in zip(one_meta["history"], two_meta["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_score"] == pytest.approx(a["val_score"], abs=1e-4)
    for key, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][key], value, rtol=1e-4, atol=1e-5)

    # killed in the middle of its second epoch (one rank dies; torchrun stops the other)
    run_dir = tmp_path / "killed"
    process = train(tiny_pipeline, run_dir, 2)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint_exists(run_dir / "checkpoints", "latest") and \
                latest(run_dir)[1]["epoch"] == 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[0][-3000:]
    rank_one = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if b"\0RANK=1\0" in environment(pid) and str(run_dir) in command_line(pid)]
    assert len(rank_one) == 1, rank_one  # torchrun's worker of rank 1 for this run
    os.kill(rank_one[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output[-2000:]
    assert latest(run_dir)[1]["epoch"] < 3
    resumed = finished(train(tiny_pipeline, run_dir, 2))
    assert "resuming after epoch" in resumed
    state, meta = latest(run_dir)
    assert meta["epoch"] == 3
    for key, value in two_state["model"].items():  # the uninterrupted 2-process run's
        assert torch.equal(state["model"][key], value), key


def test_more_processes_than_gpus_are_refused_in_one_line():
    from medpipe.errors import MedpipeError
    from medpipe.training.distributed import Processes, gpu_of

    assert gpu_of(Processes(rank=3, world_size=4, local_rank=1), gpus=2) == 1
    with pytest.raises(MedpipeError) as refused:
        gpu_of(Processes(rank=1, world_size=2, local_rank=1), gpus=1)
    message = str(refused.value)
    assert "cuda:1" in message and "1 GPU(s)" in message and "--processes 1" in message
    assert "\n" not in message


def test_nnunet_resenc_takes_ddp_steps(tmp_path):
    """nnU-Net's ResEnc U-Net computes a lowest deep-supervision output that nnU-Net's loss
    weights 0 (medpipe drops it): its head never gets a gradient, which DDP (without
    find_unused_parameters) refuses at the second step; medpipe freezes that head."""
    import torch.distributed as dist
    from test_models import RESIDUAL

    from medpipe.models import NetworkShape, build_model
    from medpipe.training.distributed import Processes, wrap

    net = build_model("nnunet_resenc", NetworkShape(1, 3, RESIDUAL)).train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    try:
        model = wrap(net, Processes(0, 2, 0), torch.device("cpu"))  # DDP as for 2 ranks
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            sum(o.float().mean() for o in model(torch.randn(1, 1, 32, 32, 8))).backward()
            optimizer.step()
        trained = [n for n, p in net.named_parameters() if p.requires_grad]
        assert all(net.get_parameter(n).grad is not None for n in trained)
        assert not any("seg_layers.0" in n for n in trained)
    finally:
        dist.destroy_process_group()
