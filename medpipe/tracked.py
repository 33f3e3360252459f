"""The names under which runs are tracked in MLflow: tags, metrics and artifact folders.

Training, evaluation and the comparison report all use these, so a rename here renames
both the writer and the reader, and a report column can never go silently empty.
"""

from __future__ import annotations

# ------------------------------------------------------------------ tags
TASK = "task"  # "segmentation", "registration" or "comparison"
MODEL = "model"
FOLD = "fold"
SEED = "seed"  # a training run's seed (repeated runs of one model and fold differ in it)
RECIPE = "recipe"  # "shared" or "native" (`PipelineConfig.recipe`)
GIT_COMMIT = "git_commit"
DATA_HASH = "data_hash"
DEVICE = "device"
HOST = "host"  # the machine and precision a training's costs come from (`device.host_description`)
EVAL_CASES = "eval_cases"  # a registration evaluation's pairs: "validation" or "test"
DATASET = "dataset"
MODEL_ID = "model_id"  # the logged MLflow model of a training run
REGISTERED_MODEL = "registered_model"  # its name in the model registry
REGISTERED_VERSION = "registered_version"  # and its version there
COMPARISON = "comparison"  # the TASK of the report's parent run
COMPARISON_RUN = "comparison_run"  # on each compared run: the report's run id
FAILURE = "failure"  # why a run did not finish: its error's first line

# ------------------------------------------------------------------ training, per epoch
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "lr"
EPOCH_SECONDS = "epoch_seconds"
# of it, the seconds the loop waited for the loader's next batch: on a GPU, time the device
# sat idle for want of data (each step ends in a host sync, so the wait is not hidden)
DATA_WAIT_SECONDS = "data_wait_seconds"
VAL_SECONDS = "val_seconds"
VAL_DICE = "val_dice"  # the validation score that picks the `best` checkpoint
EPOCH_SAMPLES = "epoch_samples"  # patches or pairs drawn in the epoch
# the costs so far, at the end of each epoch: the x axes of "Dice at equal cost"
SAMPLES_SEEN = "samples_seen"
ELAPSED_SECONDS = "elapsed_training_seconds"  # training and validation
PEAK_MEMORY_MB = "peak_memory_mb"
SKIPPED_STEPS = "skipped_steps"  # steps not taken: a non-finite loss or gradient
GRAD_NORM = "grad_norm"  # the epoch's mean gradient norm before clipping, taken steps
GRAD_NORM_MAX = "grad_norm_max"

# ------------------------------------------------------------------ training, at the end
BEST_VAL_DICE = "best_val_dice"
PARAMETERS = "parameters"
TRAINING_SECONDS = "training_seconds"
SKIPPED_STEPS_TOTAL = "skipped_steps_total"

# ------------------------------------------------------------------ evaluation
EVAL_MEAN_DICE = "eval_mean_dice"
EVAL_MEAN_HD95 = "eval_mean_hd95"
EVAL_SECONDS_PER_CASE = "eval_seconds_per_case"
EVAL_SECONDS_PER_PAIR = "eval_seconds_per_pair"
EVAL_FOLDING_PERCENT = "eval_folding_percent"
EVAL_SDLOGJ = "eval_sdlogj"
# Learn2Reg's definitions, labelled as theirs (see `metrics.deformation_metrics`)
EVAL_SDLOGJ_LEARN2REG = "eval_sdlogj_learn2reg"
EVAL_DICE30 = "eval_dice30"
EVAL_MEAN_HD95_VOXELS = "eval_mean_hd95_voxels"

# ------------------------------------------------------------------ the report, per run
# logged by `medpipe compare` on every compared run, the same two names for every model and
# method, so MLflow's runs table holds one column of each for all of them
REPORT_MEAN_DICE = "report_mean_dice"  # the model's mean Dice in the report (its cases)
TRAINING_MINUTES = "training_minutes"  # the model's mean training time per fold
# what a comparison writes back onto its runs: the output of one report, not the run's own
# record (an archive of runs leaves them out; a report over other runs would give others)
REPORT_WRITEBACK = frozenset({COMPARISON_RUN, REPORT_MEAN_DICE, TRAINING_MINUTES})

# ------------------------------------------------------------------ MLflow's own UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # which view MLflow's UI opens
MODEL_TRAINING_KIND = "custom_model_development"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-table view, as JSON
COMPARISON_VIEW = "medpipe-comparison"  # the key of the view `compare` writes

# ------------------------------------------------------------------ artifacts
EVALUATION_FOLDER = "evaluation"
TEST_EVALUATION_FOLDER = "evaluation_test"  # a run's own scores of the labelled test cases
TEST_MEAN_DICE = "test_mean_dice"
FIGURES_FOLDER = "figures"
CHECKPOINTS_FOLDER = "checkpoints"
REPORT_FOLDER = "report"


def throughput(unit: str) -> str:
    """Samples per second of a task whose samples are UNIT ("patches", "pairs")."""
    return f"{unit}_per_s"


def val_class_dice(class_name: str) -> str:
    return f"{VAL_DICE}_{class_name}"


def eval_metric(metric: str) -> str:
    """An evaluation summary's mean of METRIC ("folding_percent", "sdlogj", ...)."""
    return f"eval_{metric}"


def eval_class_metric(metric: str, class_name: str) -> str:
    """METRIC ("dice", "hd95", "volume_diff_ml") of one class, mean over cases."""
    return f"eval_{metric}_{class_name}"


def class_of_eval_metric(name: str, metric: str) -> str | None:
    """The class an `eval_class_metric(METRIC, class)` name is about, else None."""
    prefix = f"eval_{metric}_"
    return name.removeprefix(prefix) if name.startswith(prefix) else None
