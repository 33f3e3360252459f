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
    # steps between reads of the device (losses, skip counts, divergence, progress); None:
    # every step on a CPU (free there), every 25 on a GPU, which then never waits
    sync_every: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Callback:
    """Hooks; the default ones do nothing."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_iteration_end(self, trainer: Trainer, iteration: int, loss: float) -> None:
        """After ITERATION (0-based, within the epoch) whenever the engine reads the device
        (`EngineSettings.sync_every`), with the mean loss since the last call."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class StepRecord:
    """An epoch's step outcomes, kept on the device until read: the losses and gradient
    norms of the steps taken, the skipped steps, and the first run of NONFINITE_LIMIT
    problem steps in a row (a non-finite loss, or gradient outside fp16's loss scaling)."""

    def __init__(self, device: torch.device, limit: int) -> None:
        zero = torch.zeros((), device=device)
        self.limit = limit
        self.loss_sum, self.losses, self.skipped, self.run = zero, zero, zero, zero
        self.norm_sum, self.norms, self.norm_max = zero, zero, torch.full_like(zero, -math.inf)
        self.hit = torch.full_like(zero, -1)  # the iteration that completed the run, or -1
        self.hit_loss, self.hit_norm = zero, zero
        self.window_sum, self.window_n, self.last_iteration = zero, zero, None

    def add(self, iteration: int, loss: torch.Tensor, norm: torch.Tensor,
            overflow_is_expected: bool) -> None:
        loss, norm = loss.float(), norm.float()
        bad_loss, bad_norm = ~torch.isfinite(loss), ~torch.isfinite(norm)
        problem = bad_loss | (bad_norm & (not overflow_is_expected))
        taken = ~(bad_loss | bad_norm)
        self.skipped = self.skipped + (bad_loss | bad_norm).float()
        kept_loss = torch.where(problem, 0.0, loss)
        self.loss_sum, self.losses = self.loss_sum + kept_loss, self.losses + (~problem).float()
        self.window_sum = self.window_sum + kept_loss
        self.window_n = self.window_n + (~problem).float()
        kept_norm = torch.where(taken, norm, 0.0)
        self.norm_sum, self.norms = self.norm_sum + kept_norm, self.norms + taken.float()
        self.norm_max = torch.maximum(self.norm_max, torch.where(taken, norm, -math.inf))
        self.run = (self.run + 1) * problem.float()
        first = (self.run >= self.limit) & (self.hit < 0)
        self.hit = torch.where(first, float(iteration), self.hit)
        self.hit_loss = torch.where(first, loss, self.hit_loss)
        self.hit_norm = torch.where(first, norm, self.hit_norm)
        self.last_iteration = iteration

    def divergence(self) -> tuple[int, str] | None:
        """(iteration, what was not finite) of the first run of problem steps, or None."""
        hit = int(self.hit)
        if hit < 0:
            return None
        loss, norm = float(self.hit_loss), float(self.hit_norm)
        return hit, (f"the loss is {loss}" if not math.isfinite(loss)
                     else f"the gradient norm is {norm}")

    def window(self) -> tuple[int | None, float]:
        """The last iteration and the mean loss since the last call."""
        n = float(self.window_n)
        loss = float(self.window_sum) / n if n else math.nan
        self.window_sum, self.window_n = torch.zeros_like(self.window_sum), torch.zeros_like(
            self.window_n)
        return self.last_iteration, loss

    def summary(self) -> dict[str, float]:
        losses, norms = float(self.losses), float(self.norms)
        return {
            tracked.TRAIN_LOSS: float(self.loss_sum) / losses if losses else math.nan,
            tracked.SKIPPED_STEPS: int(self.skipped),
            tracked.GRAD_NORM: float(self.norm_sum) / norms if norms else math.nan,
            tracked.GRAD_NORM_MAX: float(self.norm_max) if norms else math.nan,
        }


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
        learning rate, throughput and seconds. `fit` calls it; benchmarks time it alone.

        A step does not wait for the device: whether its loss and gradient were finite
        stays on the device (`StepRecord`), and a fused optimizer skips a bad step there
        (`found_inf`, as GradScaler uses it), so the host reads the counts every
        `sync_every` steps only. An optimizer without that support is stepped after one
        read per step."""
        torch.manual_seed(epoch_seed(self.settings.seed, self.epoch))
        self.model.train()
        device = self.settings.device
        skips_on_device = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        sync_every = self.settings.sync_every or (1 if device.type == "cpu" else 25)
        record = StepRecord(device, self.settings.nonfinite_limit)
        samples = 0
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
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
            loss_finite = torch.isfinite(loss.detach())
            # a non-finite loss makes every gradient non-finite (x/0), so the step is
            # skipped by the same test as an overflowing gradient, on every rank
            self.scaler.scale(loss / loss_finite.to(loss.dtype)).backward()
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(),
                                            self.settings.grad_clip or math.inf)
            norm_finite = torch.isfinite(norm)
            if self.scaler.is_enabled():  # fp16: the scaler skips an overflow, lowers its
                self.scaler.step(self.optimizer)  # scale (expected while it finds its
                self.scaler.update()  # level): counted, not a divergence
            elif skips_on_device:
                self.optimizer.found_inf = (~norm_finite).float()
                self.optimizer.grad_scale = None
                self.optimizer.step()
                del self.optimizer.found_inf, self.optimizer.grad_scale
            elif norm_finite:  # one read of the device per step
                self.optimizer.step()
            record.add(iteration, global_loss, norm, overflow_is_expected=self.scaler.is_enabled())
            self.scheduler.step()  # the schedule follows the budget, taken steps or not
            samples += count * self.processes.world_size
            if (iteration + 1) % sync_every == 0:
                self._check(record)
        self._check(record)
        seconds = time.perf_counter() - start
        return {
            **record.summary(),
            tracked.LEARNING_RATE: lr,
            tracked.throughput(self.task.unit): samples / seconds,
            tracked.EPOCH_SECONDS: seconds,
            tracked.DATA_WAIT_SECONDS: waited,
            tracked.EPOCH_SAMPLES: samples,
        }

    def _check(self, record: StepRecord) -> None:
        """Read the device's step counts: stop a diverged run, report progress."""
        diverged = record.divergence()
        if diverged is not None:
            iteration, problem = diverged
            raise MedpipeError(
                f"training diverged: {problem} at epoch {self.epoch + 1}, iteration "
                f"{iteration + 1}, {self.settings.nonfinite_limit} non-finite steps in a row; "
                "the last checkpoint is from before it (check the data with `medpipe verify`, "
                "or lower the learning rate)", self.checkpoint_dir)
        iteration, loss = record.window()
        if iteration is not None:
            for callback in self.callbacks:
                callback.on_iteration_end(self, iteration, loss)

    def _autocast(self):
        return autocast(self.settings.device, self.dtype)
