"""The one training engine, shared by segmentation and registration.

A task supplies its batches, its loss and its validation; the engine owns everything else:
the epoch x iteration loop, device and mixed precision, gradient clipping, skipping a step
whose loss or gradient is not finite (and stopping on a run of them), the schedule,
checkpoints (`latest` every epoch, `best` on the validation score), exact resume, and the
callbacks that draw progress or log to a tracker. It never imports a tracking library.

Exact resume: at the start of every epoch the global torch RNG is re-seeded from
(seed, epoch), and tasks draw their batches from (seed, epoch, index) (see
`training.patches`), so a run resumed from `latest` continues bit for bit as if it had
never stopped.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medpipe import tracked
from medpipe.device import autocast, autocast_dtype, peak_memory_mb
from medpipe.errors import MedpipeError
from medpipe.runs.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from medpipe.training.distributed import ONE_PROCESS, Processes, mean_over_ranks, wrap


class TrainingTask(Protocol):
    """What a task gives the engine. `validate` returns metrics with a `score` key
    (higher is better) that picks the `best` checkpoint."""

    unit: str  # what one sample is: "patches", "pairs"

    def batches(self, epoch: int, processes: Processes) -> Iterable[Any]:
        """The epoch's batches, PROCESSES' rank's share of each (`rank_batches`)."""
        ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """The loss of one batch and how many samples it held."""
        ...

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


@dataclass(frozen=True)
class EngineSettings:
    epochs: int
    iterations_per_epoch: int
    val_every: int
    seed: int = 0
    amp: bool = True
    amp_dtype: str = "auto"  # TrainingConfig.amp_dtype
    grad_clip: float | None = 12.0
    # a step whose loss or gradient is not finite is skipped (counted as `skipped_steps`), as
    # GradScaler skips an fp16 overflow; this many in a row stop the run as diverged
    nonfinite_limit: int = 3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Callback:
    """Hooks; the default ones do nothing."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_iteration_end(self, trainer: Trainer, iteration: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        task: TrainingTask,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        settings: EngineSettings,
        checkpoint_dir: Path,
        metadata: dict[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        processes: Processes = ONE_PROCESS,
    ) -> None:
        self.model = model.to(settings.device)
        self.processes = processes
        self.step_model = wrap(self.model, processes, settings.device)  # DDP with several
        self.task = task
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metadata = dict(metadata or {})  # construction args etc., saved with every checkpoint
        self.callbacks = list(callbacks)
        self.dtype = autocast_dtype(settings.device, settings.amp, settings.amp_dtype)
        self.scaler = torch.amp.GradScaler(settings.device.type,
                                           enabled=self.dtype == torch.float16)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []
        self.best_score = -math.inf
        self.best_epoch: int | None = None

    # ------------------------------------------------------------------ state

    def resume(self) -> bool:
        """Continue from `latest` if there is one; True when it was loaded."""
        if not checkpoint_exists(self.checkpoint_dir, "latest"):
            return False
        state, meta = load_checkpoint(self.checkpoint_dir, "latest", self.settings.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # a checkpoint of another precision (bf16/fp32: an empty scaler state) leaves an fp16
        # run's scaler at its initial scale; fp16's state is ignored by a disabled scaler
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"].cpu())  # RNG states must be CPU byte tensors
        # a checkpoint from a machine with more GPUs (or none): the states of the GPUs here
        for index, rng in enumerate(state.get("rng_cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng.cpu(), index)
        self.epoch = meta["epoch"]
        self.history = meta["history"]
        self.best_score = meta["best_score"] if meta["best_score"] is not None else -math.inf
        self.best_epoch = meta["best_epoch"]
        return True

    def _metadata(self) -> dict[str, Any]:
        return {
            **self.metadata,
            "epoch": self.epoch,
            "epochs": self.settings.epochs,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def _save(self, improved: bool) -> None:
        rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": rng_cuda,
        }
        if improved:  # `best` first: `latest` marks the epoch as done
            save_checkpoint(self.checkpoint_dir, "best", {"model": state["model"]},
                            self._metadata())
        save_checkpoint(self.checkpoint_dir, "latest", state, self._metadata())

    # ------------------------------------------------------------------ loop

    def fit(self) -> list[dict[str, float]]:
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.epoch < self.settings.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            improved = False
            last = self.epoch == self.settings.epochs
            validates = last or self.epoch % self.settings.val_every == 0
            if validates and self.processes.is_main:  # the other ranks do not repeat it
                self.model.eval()
                start = time.perf_counter()
                with torch.no_grad(), self._autocast():
                    validation = self.task.validate(self.model, self.settings.device)
                metrics.update({f"val_{k}": v for k, v in validation.items()})
                metrics[tracked.VAL_SECONDS] = time.perf_counter() - start
                score = validation["score"]
                if math.isfinite(score) and score > self.best_score:
                    self.best_score, self.best_epoch, improved = score, self.epoch, True
            metrics[tracked.PEAK_MEMORY_MB] = peak_memory_mb(self.settings.device)
            before = self.history[-1] if self.history else {}
            metrics[tracked.SAMPLES_SEEN] = (before.get(tracked.SAMPLES_SEEN, 0)
                                             + metrics[tracked.EPOCH_SAMPLES])
            metrics[tracked.ELAPSED_SECONDS] = (before.get(tracked.ELAPSED_SECONDS, 0.0)
                                                + metrics[tracked.EPOCH_SECONDS]
                                                + metrics.get(tracked.VAL_SECONDS, 0.0))
            self.history.append({"epoch": self.epoch, **metrics})
            if self.processes.is_main:
                self._save(improved)
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.history

    def summary(self) -> dict[str, Any]:
        """The costs and result of the training so far, for reports and the workflow."""
        return {
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "training_seconds": sum(
                h[tracked.EPOCH_SECONDS] + h.get(tracked.VAL_SECONDS, 0.0) for h in self.history
            ),
            "samples_seen": sum(h.get(tracked.EPOCH_SAMPLES, 0) for h in self.history),
            "skipped_steps": sum(h.get(tracked.SKIPPED_STEPS, 0) for h in self.history),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "peak_memory_mb": max((h[tracked.PEAK_MEMORY_MB] for h in self.history),
                                  default=None),
            "device": str(self.settings.device),
        }

    def train_epoch(self) -> dict[str, float]:
        """One epoch of optimisation steps (no validation, no checkpoint): its mean loss,
        learning rate, throughput and seconds. `fit` calls it; benchmarks time it alone."""
        torch.manual_seed(epoch_seed(self.settings.seed, self.epoch))
        self.model.train()
        device = self.settings.device
        losses, samples = [], 0
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        skipped, in_a_row, norms = 0, 0, []
        waited = 0.0
        batches = iter(self.task.batches(self.epoch, self.processes))
        for iteration in itertools.count():
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, count = self.task.loss(self.step_model, batch, device)
            # the global batch's loss (every rank's share averaged) and, after DDP's
            # all-reduce, one gradient: every rank takes the same decision below
            global_loss = mean_over_ranks(loss.detach(), self.processes)
            problem = None
            if not torch.isfinite(global_loss):
                problem = f"the loss is {float(global_loss)}"
            else:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                norm = nn.utils.clip_grad_norm_(self.model.parameters(),
                                                self.settings.grad_clip or math.inf)
                if torch.isfinite(norm):
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    norms.append(float(norm))
                elif self.scaler.is_enabled():  # fp16 overflow: the scaler skips the step
                    self.scaler.step(self.optimizer)  # and lowers its scale (expected while
                    self.scaler.update()  # it finds its level): counted, not a divergence
                    skipped += 1
                else:
                    problem = f"the gradient norm is {float(norm)}"
            if problem is None:
                in_a_row = 0
                losses.append(float(global_loss))
            else:  # skipped, the weights untouched; several in a row end the run
                skipped, in_a_row = skipped + 1, in_a_row + 1
                self.optimizer.zero_grad(set_to_none=True)
                if in_a_row >= self.settings.nonfinite_limit:
                    raise MedpipeError(
                        f"training diverged: {problem} at epoch {self.epoch + 1}, iteration "
                        f"{iteration + 1}, {in_a_row} non-finite steps in a row; the last "
                        "checkpoint is from before it (check the data with `medpipe verify`, "
                        "or lower the learning rate)", self.checkpoint_dir)
            self.scheduler.step()  # the schedule follows the budget, taken steps or not
            samples += count * self.processes.world_size
            for callback in self.callbacks:
                callback.on_iteration_end(self, iteration, float(global_loss))
        seconds = time.perf_counter() - start
        return {
            tracked.TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
            tracked.SKIPPED_STEPS: skipped,
            tracked.GRAD_NORM: float(np.mean(norms)) if norms else math.nan,
            tracked.GRAD_NORM_MAX: max(norms, default=math.nan),
            tracked.LEARNING_RATE: lr,
            tracked.throughput(self.task.unit): samples / seconds,
            tracked.EPOCH_SECONDS: seconds,
            tracked.DATA_WAIT_SECONDS: waited,
            tracked.EPOCH_SAMPLES: samples,
        }

    def _autocast(self):
        return autocast(self.settings.device, self.dtype)
