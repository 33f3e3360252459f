"""Several processes training one model: torch.distributed with DistributedDataParallel.

Launched by `torchrun --nproc_per_node N medpipe ...` (or `medpipe train-seg --processes N`,
which starts torchrun itself), each process reads its rank from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). NCCL between GPUs (one per process,
the local rank's), gloo between CPU processes. What the engine does with it:

- every global batch is the one a single process would draw (samples are pure functions of
  (seed, epoch, index)); rank r takes its contiguous 1/N share of each
  (`sampling.rank_batches`), so
  N processes x batch b see exactly the samples of 1 process x batch N*b;
- DDP averages the gradients, so every rank takes the same optimiser step;
- only rank 0 validates, writes checkpoints, figures and the summary, and talks to MLflow;
  the others wait for it where it writes what they read (the run folder, `latest`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medpipe.errors import MedpipeError

# rank 0 validates alone while the others wait at the next collective: allow a long one
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place among the ones training one model (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Processes()


def from_environment() -> Processes:
    """The launcher's description of this process (torchrun's variables), or one process."""
    if "WORLD_SIZE" not in os.environ:
        return Processes()
    return Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ.get("LOCAL_RANK", 0)))


def start(processes: Processes, device: torch.device) -> torch.device:
    """Join the process group (nothing for one process); the device this rank trains on:
    with CUDA, the local rank's GPU."""
    if not processes.several:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", gpu_of(processes, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=processes.rank, world_size=processes.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return device


def gpu_of(processes: Processes, gpus: int) -> int:
    """The GPU this process trains on, its local rank's; more processes on a machine than it
    has GPUs are refused (two on one GPU would each need all of its memory)."""
    if processes.local_rank >= gpus:
        raise MedpipeError(
            f"process {processes.rank} of {processes.world_size} would train on "
            f"cuda:{processes.local_rank}, but this machine has {gpus} GPU(s): start at most "
            f"{gpus} process(es) per machine (--processes {max(gpus, 1)}), or train on the "
            "CPU (training.device: cpu)")
    return processes.local_rank


def stop(processes: Processes) -> None:
    if processes.several and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_main(processes: Processes) -> None:
    """Every rank waits here until all arrive (after rank 0 wrote what the others read)."""
    if processes.several:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, processes: Processes) -> torch.Tensor:
    """VALUE averaged over the ranks (gloo has no AVG: a sum, divided)."""
    if not processes.several:
        return value
    total = value.detach().float().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / processes.world_size


def wrap(model: torch.nn.Module, processes: Processes,
         device: torch.device) -> torch.nn.Module:
    """The module the training steps run: DDP around MODEL with several processes (its
    gradients averaged in backward), MODEL itself with one."""
    if not processes.several:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids: Sequence[int] | None = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
