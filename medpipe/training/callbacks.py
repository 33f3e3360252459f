"""Engine callbacks: a live progress display and logging to a `Tracker`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medpipe.config import PipelineConfig
from medpipe.figures import plot_learning_curve
from medpipe.tracking import Tracker, flatten
from medpipe.training.engine import Callback, Trainer


class ProgressPrinter(Callback):
    """A progress bar over all iterations (loss, validation score, samples/s) on a terminal,
    and one line per epoch everywhere (a Snakemake log, CI)."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.title = title
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task_id = None
        self.score = float("nan")
        self.epoch_start = time.perf_counter()

    def on_train_start(self, trainer: Trainer) -> None:
        settings = trainer.settings
        total = settings.epochs * settings.iterations_per_epoch
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[score]:.3f}"),
            TextColumn("{task.fields[rate]:.1f} " + trainer.task.unit + "/s"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(
            self.title, total=total, completed=trainer.epoch * settings.iterations_per_epoch,
            loss=float("nan"), score=self.score, rate=0.0,
        )
        if trainer.epoch:
            self.console.print(f"{self.title}: resuming after epoch {trainer.epoch}")
        self.epoch_start = time.perf_counter()

    def on_iteration_end(self, trainer: Trainer, iteration: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.epoch_start
        batch = getattr(getattr(trainer.task, "dataset", None), "batch_size", 1)
        self.progress.update(self.task_id, advance=1, loss=loss,
                             rate=(iteration + 1) * batch / max(elapsed, 1e-9))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.score = metrics.get("val_score", self.score)
        self.progress.update(self.task_id, score=self.score)
        rate = metrics.get(f"{trainer.task.unit}_per_s", 0.0)
        line = (f"{self.title}: epoch {trainer.epoch}/{trainer.settings.epochs} "
                f"loss {metrics['train_loss']:.4f} lr {metrics['lr']:.2e} "
                f"{rate:.1f} {trainer.task.unit}/s")
        if "val_score" in metrics:
            line += f" val {metrics['val_score']:.4f}"
        self.console.print(line, highlight=False)
        self.epoch_start = time.perf_counter()

    def on_train_end(self, trainer: Trainer) -> None:
        self.progress.stop()


class TrackingCallback(Callback):
    """Params and tags once, metrics every epoch, figures and files at the end."""

    def __init__(
        self,
        tracker: Tracker,
        run_dir: Path,
        config: PipelineConfig,
        description: dict[str, Any],
        commit: str,
        class_names: dict[int, str],
    ) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.config = config
        self.description = description
        self.commit = commit
        self.class_names = class_names

    def on_train_start(self, trainer: Trainer) -> None:
        if self.tracker.resumed:
            return
        plans_config = {k: v for k, v in self._plans_block().items() if k != "reasons"}
        described = {k: v for k, v in self.description.items()
                     if k not in ("train_cases", "val_cases", "labels", "architecture")}
        self.tracker.log_params({**flatten(described, "run."), **flatten(plans_config, "plans.")})
        self.tracker.set_tags({
            "git_commit": self.commit,
            "data_hash": str(self.description.get("data_hash")),
            "device": _device_name(trainer.settings.device),
            "dataset": self.description.get("dataset_name", ""),
        })

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        named = {}
        for key, value in metrics.items():
            if key.startswith("val_dice_"):
                label = self.class_names.get(int(key.removeprefix("val_dice_")), key)
                key = f"val_dice_{label}"
            named["val_dice" if key == "val_score" else key] = value
        self.tracker.log_metrics(named, step=trainer.epoch)

    def on_train_end(self, trainer: Trainer) -> None:
        figures = self.run_dir / "figures"
        plot_learning_curve(trainer.history, figures / "learning_curve.png")
        write_figures = getattr(trainer.task, "write_figures", None)
        if write_figures is not None:  # each task draws its own validation example
            write_figures(figures)
        for name in ("model.json", "config.json", "plans.json"):
            self.tracker.log_artifact(self.run_dir / name)
        for png in sorted(figures.glob("*.png")):
            self.tracker.log_artifact(png, "figures")
        self.tracker.log_artifact(self.run_dir / "checkpoints" / "best.json", "checkpoints")
        model_id = self.tracker.log_model(self.run_dir, self.description["task"])
        if model_id:  # register it with `mlflow.register_model(f"models:/{model_id}", name)`
            self.tracker.set_tags({"model_id": model_id})
        summary = trainer.summary()
        self.tracker.log_metrics(
            {"best_val_dice": summary["best_score"], "parameters": summary["parameters"],
             "training_seconds": summary["training_seconds"]}, step=trainer.epoch)
        self.tracker.finish("FINISHED")

    def _plans_block(self) -> dict:
        import json

        plans = json.loads((self.run_dir / "plans.json").read_text(encoding="utf-8"))
        return plans["configurations"][self.description["configuration"]]


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
