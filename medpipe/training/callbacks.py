"""Engine callbacks: a live progress display and logging to a `Tracker`."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medpipe import tracked
from medpipe.device import device_name, host_description
from medpipe.figures import plot_learning_curve
from medpipe.planning.plans import PlanConfiguration
from medpipe.progress import timing
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import RunSpec
from medpipe.tracking import Tracker, flatten, registered_name
from medpipe.training.engine import Callback, Trainer


class ProgressPrinter(Callback):
    """A progress bar over all iterations (loss, validation score, samples/s) on a terminal,
    and one line per epoch everywhere (a Snakemake log, CI)."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.title = title
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.progress: Progress | None = None
        self.task_id = None
        self.score = float("nan")
        self.epoch_start = self.train_start = time.perf_counter()
        self.first_epoch = 0

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
        self.epoch_start = self.train_start = time.perf_counter()
        self.first_epoch = trainer.epoch

    def on_iteration_end(self, trainer: Trainer, iteration: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.epoch_start
        batch = getattr(getattr(trainer.task, "dataset", None), "batch_size", 1)
        done = trainer.epoch * trainer.settings.iterations_per_epoch + iteration + 1
        self.progress.update(self.task_id, completed=done, loss=loss,
                             rate=(iteration + 1) * batch / max(elapsed, 1e-9))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.score = metrics.get("val_score", self.score)
        self.progress.update(self.task_id, score=self.score)
        rate = metrics.get(tracked.throughput(trainer.task.unit), 0.0)
        line = (f"{self.title}: epoch {trainer.epoch}/{trainer.settings.epochs} "
                f"loss {metrics[tracked.TRAIN_LOSS]:.4f} "
                f"lr {metrics[tracked.LEARNING_RATE]:.2e} "
                f"{rate:.1f} {trainer.task.unit}/s")
        if "val_score" in metrics:
            line += f" val {metrics['val_score']:.4f}"
        line += " | " + timing(trainer.epoch - self.first_epoch,
                               trainer.settings.epochs - self.first_epoch,
                               time.perf_counter() - self.train_start)
        self.console.print(line, highlight=False)
        self.epoch_start = time.perf_counter()

    def on_train_end(self, trainer: Trainer) -> None:
        self.progress.stop()


class TrackingCallback(Callback):
    """Params and tags once, metrics every epoch, figures and files at the end."""

    def __init__(self, tracker: Tracker, folder: RunFolder, spec: RunSpec,
                 plan: PlanConfiguration, commit: str) -> None:
        self.tracker = tracker
        self.folder = folder
        self.spec = spec
        self.plan = plan
        self.commit = commit

    def on_train_start(self, trainer: Trainer) -> None:
        if self.tracker.resumed:
            return
        plan = self.plan.model_dump(mode="json", exclude={"reasons"})
        described = self.spec.model_dump(
            mode="json", exclude={"train_cases", "val_cases", "labels", "architecture"})
        self.tracker.log_params({**flatten(described, "run."), **flatten(plan, "plans.")})
        self.tracker.set_tags({
            tracked.GIT_COMMIT: self.commit,
            tracked.DATA_HASH: str(self.spec.data_hash),
            tracked.DEVICE: device_name(trainer.settings.device),
            tracked.HOST: host_description(trainer.settings.device, trainer.dtype),
            tracked.DATASET: self.spec.dataset_name,
        })

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """The engine's metrics under their tracked names: the task's `val_score` is
        `val_dice`, its per-class `val_dice_<value>` are named by class."""
        names = self.spec.class_names
        named = {}
        for key, value in metrics.items():
            if key == "val_score":
                key = tracked.VAL_DICE
            elif key.startswith("val_dice_"):
                value_id = int(key.removeprefix("val_dice_"))
                key = tracked.val_class_dice(names.get(value_id, str(value_id)))
            named[key] = value
        self.tracker.log_metrics(named, step=trainer.epoch)

    def on_train_end(self, trainer: Trainer) -> None:
        figures = self.folder.figures
        plot_learning_curve(trainer.history, figures / "learning_curve.png")
        write_figures = getattr(trainer.task, "write_figures", None)
        if write_figures is not None:  # each task draws its own validation example
            write_figures(figures)
        for path in (self.folder.model_file, self.folder.config_file, self.folder.plans_file):
            self.tracker.log_artifact(path)
        for png in sorted(figures.glob("*.png")):
            self.tracker.log_artifact(png, tracked.FIGURES_FOLDER)
        self.tracker.log_artifact(self.folder.checkpoint_metadata("best"),
                                  tracked.CHECKPOINTS_FOLDER)
        model_id = self.tracker.log_model(self.folder, self.spec.task)
        if model_id:  # `models:/<dataset>-<task>@<model>_fold_<k>` from now on
            self.tracker.set_tags({tracked.MODEL_ID: model_id})
            self.tracker.register_model(
                model_id, registered_name(self.spec.dataset_name, self.spec.task),
                alias=f"{self.spec.model}_fold_{self.spec.fold}")
        summary = trainer.summary()
        self.tracker.log_metrics(
            {tracked.BEST_VAL_DICE: summary["best_score"],
             tracked.PARAMETERS: summary["parameters"],
             tracked.TRAINING_SECONDS: summary["training_seconds"],
             tracked.SAMPLES_SEEN: summary["samples_seen"],
             tracked.SKIPPED_STEPS_TOTAL: summary["skipped_steps"]}, step=trainer.epoch)
        self.tracker.finish("FINISHED")
