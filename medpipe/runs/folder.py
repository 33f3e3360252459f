"""`RunFolder`: the one place that knows the layout of a run folder.

A run folder (`RESULTS/runs/MODEL/fold_K/` in the workflow, anywhere with `--run-dir`)
holds everything needed to use the model later without the pipeline:

    model.json             the run description (`runs.spec`): how to build the net and
                           prepare its input
    plans.json, config.json   the plans and the pipeline config it was trained with
    checkpoints/           {latest,best}.{pt,json}: weights and their metadata
    figures/               learning curve, validation example
    prealign.json          registration only: the per-case affine pre-alignment
    mlflow_run.json        which MLflow run the folder logs to
    training.json          written last: the run is complete when it exists
    validation/            predictions of the fold's validation cases on the raw grid
    evaluation/            cases.csv or pairs.csv, summary.json, figures
    test/, evaluation_test/   segmentation with repeated runs: this run's own predictions of
                           the labelled test cases and their scores
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_NAMES = ("latest", "best")


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def model_file(self) -> Path:
        return self.path / "model.json"

    @property
    def plans_file(self) -> Path:
        return self.path / "plans.json"

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_file(self, name: str) -> Path:
        """The weights of checkpoint NAME (`best`, `latest`)."""
        return self.checkpoints / f"{name}.pt"

    def checkpoint_metadata(self, name: str) -> Path:
        return self.checkpoints / f"{name}.json"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def prealignment_file(self) -> Path:
        return self.path / "prealign.json"

    @property
    def tracking_file(self) -> Path:
        return self.path / "mlflow_run.json"

    @property
    def tracking_journal(self) -> Path:
        """Tracking calls the store did not take yet (`tracking_buffer`)."""
        return self.path / "tracking_pending.jsonl"

    @property
    def training_summary(self) -> Path:
        return self.path / "training.json"

    @property
    def validation(self) -> Path:
        return self.path / "validation"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation"

    @property
    def evaluation_summary(self) -> Path:
        return self.evaluation / "summary.json"

    @property
    def cases_table(self) -> Path:
        """Per case and class scores of a segmentation evaluation."""
        return self.evaluation / "cases.csv"

    @property
    def pairs_table(self) -> Path:
        """Per pair and class scores of a registration evaluation."""
        return self.evaluation / "pairs.csv"

    @property
    def test_predictions(self) -> Path:
        """This run's own predictions of the labelled test cases (repeated runs)."""
        return self.path / "test"

    @property
    def test_evaluation(self) -> Path:
        """Their scores: cases.csv and summary.json, as `evaluation/` for validation."""
        return self.path / "evaluation_test"

    def holds_run(self) -> bool:
        return self.model_file.is_file()

    def discard_training(self) -> None:
        """Forget a previous training here (`--restart`): its weights, summary, MLflow run
        and pre-alignment go; evaluations are overwritten by the next one."""
        for path in (self.training_summary, self.tracking_file, self.tracking_journal,
                     self.prealignment_file):
            path.unlink(missing_ok=True)
        for name in CHECKPOINT_NAMES:
            self.checkpoint_file(name).unlink(missing_ok=True)
            self.checkpoint_metadata(name).unlink(missing_ok=True)
