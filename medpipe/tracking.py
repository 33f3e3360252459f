"""The one module that talks to MLflow.

Training and evaluation call a small `Tracker` interface; `NullTracker` lets them run with
tracking off. `MlflowTracker` uses `MlflowClient` with an explicit run id (no global
"active run"), so a resumed training and a later evaluation log into the same run.
The default store is RESULTS/mlflow.db (`config.TrackingStore`); any tracking URI (a
`mlflow server`, say) comes from the config or `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medpipe import tracked
from medpipe.config import TrackingStore
from medpipe.errors import MedpipeError
from medpipe.io import write_json
from medpipe.runs.folder import RunFolder

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on params (and a safe size for metrics) per log_batch call


class Tracker(Protocol):
    run_id: str | None
    resumed: bool  # True when an existing run was reopened (its params are already logged)

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def log_model(self, folder: RunFolder, task: str) -> str | None: ...

    def register_model(self, model_id: str, name: str, alias: str) -> int | None: ...


class NullTracker:
    """Tracking off: every call is accepted and does nothing."""

    run_id = None
    resumed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, folder: RunFolder, task: str) -> str | None:
        return None

    def register_model(self, model_id: str, name: str, alias: str) -> int | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    def __init__(self, client, run_id: str, resumed: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.resumed = resumed

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + BATCH])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def log_model(self, folder: RunFolder, task: str) -> str:
        """Log FOLDER's trained model as an MLflow pyfunc model "from code" (no pickle):
        its weights, plans and config as artifacts. Returns the logged model's id."""
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        columns = (["moving", "fixed", "output"] if task == "registration"
                   else ["image", "output"])
        signature = ModelSignature(inputs=Schema([ColSpec("string", c) for c in columns]),
                                   outputs=Schema([ColSpec("string", "output")]))
        code = Path(__file__).parent / "inference" / "mlflow_model.py"
        with tempfile.TemporaryDirectory() as staging:
            files = RunFolder(Path(staging) / "run")
            files.checkpoints.mkdir(parents=True)
            for source, target in (
                    (folder.model_file, files.model_file), (folder.plans_file, files.plans_file),
                    (folder.config_file, files.config_file),
                    (folder.checkpoint_file("best"), files.checkpoint_file("best")),
                    (folder.checkpoint_metadata("best"), files.checkpoint_metadata("best"))):
                shutil.copy2(source, target)
            saved = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(self.client.tracking_uri)  # also writes os.environ
            try:
                with mlflow.start_run(run_id=self.run_id):
                    info = mlflow.pyfunc.log_model(
                        name="model", python_model=str(code),
                        artifacts={"run": str(files.path)}, signature=signature,
                        code_paths=[str(Path(__file__).parent)],
                        pip_requirements=model_requirements(),
                    )
            finally:  # a later subprocess of this process must not inherit this store
                if saved is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = saved
        return info.model_id

    def register_model(self, model_id: str, name: str, alias: str) -> int:
        """Register the logged model MODEL_ID as a new version of NAME, with ALIAS pointing
        at it (moved from an older version); the version is tagged on the run."""
        if not self.client.search_registered_models(f"name = '{name}'"):
            self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, f"models:/{model_id}", run_id=self.run_id, model_id=model_id).version
        self.client.set_registered_model_alias(name, alias, version)
        self.set_tags({tracked.REGISTERED_MODEL: name, tracked.REGISTERED_VERSION: version})
        return int(version)


# what the logged model's code (medpipe's own, stored with it) imports, pinned to the versions
# that trained it, so it loads the same in a fresh environment
CHAMPION = "champion"  # the registry alias of the comparison's winner
MODEL_REQUIREMENTS = ("torch", "monai", "SimpleITK", "nibabel", "numpy", "scipy", "pydantic",
                      "PyYAML", "scikit-learn", "pandas", "rich", "matplotlib")


def model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]


def registered_name(dataset: str, task: str) -> str:
    """The registry name of a dataset's trained models of one task ("segmentation",
    "registration"): every trained fold is a version, aliased `<model>_fold_<k>`."""
    return f"{dataset}-{task}"


def set_champion(uri: str, name: str, version: int) -> None:
    """Point alias `champion` of registered model NAME at VERSION (the comparison's winner)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        name, CHAMPION, str(version))


def open_tracker(
    store: TrackingStore | None,
    dataset: str,
    run_name: str,
    folder: RunFolder,
    tags: Mapping[str, str] | None = None,
) -> Tracker:
    """The tracker for the run kept in FOLDER: reopened if that folder already logged to
    this store (a resumed training, an evaluation), else a new run in the store's
    experiment (by default DATASET's). No STORE: tracking is off. A store that fails, now
    or later, never stops the caller: calls wait in FOLDER's journal
    (`tracking_buffer.BufferedTracker`)."""
    if store is None:
        return NullTracker()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise MedpipeError("tracking is on but mlflow is not installed") from None
    # MLflow retries a failed HTTP call for minutes by default (7 retries, backoff 2): a
    # down server would stall every epoch; the buffer retries later instead
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(name, value)
    from medpipe.tracking_buffer import BufferedTracker

    return BufferedTracker(lambda: _open_mlflow_run(store, dataset, run_name, folder, tags),
                           folder)


def _open_mlflow_run(store: TrackingStore, dataset: str, run_name: str, folder: RunFolder,
                     tags: Mapping[str, str] | None) -> MlflowTracker:
    from mlflow import MlflowClient

    uri = store.uri
    if store.artifact_root is not None:
        store.artifact_root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    known = read_run_file(folder)
    if known and known.get("tracking_uri") == uri:
        try:
            client.update_run(known["run_id"], status="RUNNING")
            return MlflowTracker(client, known["run_id"], resumed=True)
        except Exception:  # the store was reset since: start afresh below
            pass
    name = store.experiment_for(dataset)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(
        name, artifact_location=store.artifact_root and store.artifact_root.as_uri(),
        tags={tracked.EXPERIMENT_KIND_TAG: tracked.MODEL_TRAINING_KIND})
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    write_json(
        {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id},
        folder.tracking_file,
    )
    return MlflowTracker(client, run.info.run_id)


def download_model(uri: str, tracking_uri: str | None = None) -> Path:
    """The run folder inside an MLflow model (`models:/<model_id>`, `models:/name@alias`,
    `models:/name/version`), downloaded to a local cache folder."""
    import mlflow

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise MedpipeError(f"{uri} names a model in an MLflow store: say which one with "
                           "MLFLOW_TRACKING_URI (a workflow's default store is "
                           "sqlite:///RESULTS/mlflow.db)")
    check_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as error:  # MLflow raises its own exception types per store
        raise MedpipeError(f"cannot load MLflow model {uri}: {str(error)[:300]}") from None
    found = sorted(local.rglob("model.json"))
    if not found:
        raise MedpipeError(f"MLflow model {uri} holds no medpipe run (model.json)", local)
    return found[0].parent


TEST_CASES = "test_cases.csv"  # TrackedRun.files' name for `evaluation_test/cases.csv`


@dataclass(frozen=True)
class TrackedRun:
    """A finished run as plain data: what the comparison report is built from."""

    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each
    # local copies: cases.csv / pairs.csv, test_cases.csv (the run's own test-set scores,
    # repeated segmentation runs), example.png
    files: dict[str, str]
    # per epoch: validation Dice, and the costs so far (samples seen, training seconds)
    histories: dict[str, list[tuple[int, float]]]

    @property
    def val_dice_history(self) -> list[tuple[int, float]]:
        return self.histories.get(tracked.VAL_DICE, [])

    def cost_curve(self, cost: str) -> list[tuple[float, float]]:
        """(COST so far, validation Dice) at each validated epoch; COST is
        `tracked.SAMPLES_SEEN` or `tracked.ELAPSED_SECONDS`."""
        costs = dict(self.histories.get(cost, []))
        return [(costs[step], dice) for step, dice in self.val_dice_history if step in costs]


def finished_runs(uri: str, experiment: str) -> list[TrackedRun]:
    """Every finished segmentation or registration run of EXPERIMENT: id, tags, params,
    latest metrics, the history of `val_dice`, and the local paths of its evaluation CSV
    files and of an example figure."""
    from mlflow import MlflowClient

    check_store(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise MedpipeError(f"no MLflow experiment {experiment!r} in {uri}")
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=10000)
    out = []
    for run in runs:
        tags = dict(run.data.tags)
        if tags.get(tracked.TASK) not in ("segmentation", "registration"):
            continue
        files = {}
        for name, artifact in (("cases.csv", f"{tracked.EVALUATION_FOLDER}/cases.csv"),
                               ("pairs.csv", f"{tracked.EVALUATION_FOLDER}/pairs.csv"),
                               (TEST_CASES, f"{tracked.TEST_EVALUATION_FOLDER}/cases.csv")):
            try:
                files[name] = client.download_artifacts(run.info.run_id, artifact)
            except Exception:  # not every run has every file
                continue
        example = _example_figure(client, run.info.run_id)
        if example:
            files["example.png"] = example
        histories = {
            name: sorted({m.step: m.value
                          for m in client.get_metric_history(run.info.run_id, name)}.items())
            for name in (tracked.VAL_DICE, tracked.SAMPLES_SEEN, tracked.ELAPSED_SECONDS)}
        out.append(TrackedRun(run.info.run_id, tags, dict(run.data.params),
                              dict(run.data.metrics), files, histories))
    return out


@dataclass(frozen=True)
class UnfinishedRun:
    """A training that failed or was stopped: named in the report, not compared."""

    task: str
    model: str
    fold: str
    status: str  # MLflow's: FAILED or KILLED
    reason: str  # its error's first line (`tracked.FAILURE`), or "" where none was tagged
    epochs: int  # epochs it completed
    seed: str = ""  # its training seed ("" where none was tagged: a baseline, an older run)


def unfinished_runs(uri: str, experiment: str) -> list[UnfinishedRun]:
    """Every segmentation or registration run of EXPERIMENT that failed or was killed (a
    run resumed to the end is FINISHED again and is not among them)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    out = []
    for status in ("FAILED", "KILLED"):
        for run in client.search_runs([found.experiment_id], f"attributes.status = '{status}'",
                                      max_results=10000):
            tags = run.data.tags
            if tags.get(tracked.TASK) not in ("segmentation", "registration"):
                continue
            steps = [m.step for m in client.get_metric_history(run.info.run_id,
                                                               tracked.SAMPLES_SEEN)]
            out.append(UnfinishedRun(tags[tracked.TASK], tags.get(tracked.MODEL, "?"),
                                     tags.get(tracked.FOLD, "?"), status,
                                     tags.get(tracked.FAILURE, ""), max(steps, default=0),
                                     tags.get(tracked.SEED, "")))
    return sorted(out, key=lambda r: (r.task, r.model, r.fold))


def _example_figure(client: Any, run_id: str) -> str | None:
    """A run's example figure: the evaluation's first pair (fixed, moving, warped,
    deformation grid, Jacobian) for registration, else the validation overlay."""
    try:
        evaluation = [a.path for a in client.list_artifacts(run_id, tracked.EVALUATION_FOLDER)
                      if a.path.endswith(".png")]
        figures = [a.path for a in client.list_artifacts(run_id, tracked.FIGURES_FOLDER)
                   if a.path.endswith("overlay.png")]
        chosen = sorted(evaluation)[:1] or sorted(figures)[:1]
        return client.download_artifacts(run_id, chosen[0]) if chosen else None
    except Exception:  # a store without the artifacts (deleted, moved): no example
        return None


def log_parent_run(uri: str, experiment: str, children: Mapping[str, Mapping[str, float]],
                   files: list[Path], metrics: Mapping[str, float],
                   params: Mapping[str, str]) -> str:
    """A run holding the comparison report, its headline numbers as metrics and what they
    were scored on as params. The compared runs (CHILDREN: run id -> the report's numbers
    for it) get those numbers as metrics and the report's run id as a tag, not nested
    under it: MLflow's runs table folds nested runs under their parent, hiding them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent = client.create_run(experiment_id, run_name="comparison",
                               tags={tracked.TASK: tracked.COMPARISON,
                                     tracked.GIT_COMMIT: git_commit()})
    tracker = MlflowTracker(client, parent.info.run_id)
    tracker.log_metrics(metrics)
    tracker.log_params(dict(params))
    for path in files:
        tracker.log_artifact(path, tracked.REPORT_FOLDER)
    for child, numbers in children.items():
        client.set_tag(child, tracked.COMPARISON_RUN, parent.info.run_id)
        if "mlflow.parentRunId" in client.get_run(child).data.tags:  # nested by an older
            client.delete_tag(child, "mlflow.parentRunId")  # medpipe: unfold it
        MlflowTracker(client, child).log_metrics(numbers)
    tracker.finish("FINISHED")
    return parent.info.run_id


def write_comparison_view(uri: str, experiment: str) -> str:
    """Tag EXPERIMENT for MLflow's model-training view and store the runs table's view of the
    comparison in it (MLflow's shared view state: an experiment tag its UI reads for the
    `viewStateShareKey` in the page address): the report's Dice and training minutes as
    columns, the best first. Returns that page's address within the UI (after its host)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    columns = [f"metrics.`{tracked.REPORT_MEAN_DICE}`", f"metrics.`{tracked.TRAINING_MINUTES}`",
               f"tags.`{tracked.TASK}`"]
    view = {"selectedColumns": columns, "orderByKey": columns[0], "orderByAsc": False}
    client.set_experiment_tag(experiment_id, tracked.EXPERIMENT_KIND_TAG,
                              tracked.MODEL_TRAINING_KIND)
    client.set_experiment_tag(experiment_id, tracked.SHARED_VIEW_TAG + tracked.COMPARISON_VIEW,
                              json.dumps(view))
    address = (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
               f"&viewStateShareKey={tracked.COMPARISON_VIEW}")
    client.set_experiment_tag(experiment_id, "mlflow.note.content",
                              f"medpipe: [the comparison's runs table]({address}), every model "
                              "and method with the report's mean Dice and training minutes")
    return address


def check_store(uri: str) -> None:
    """Refuse a `sqlite:///` store that does not exist (MLflow would create an empty one
    there and then find nothing in it)."""
    store = sqlite_file(uri)
    if store is not None and not store.is_file():
        raise MedpipeError("no MLflow store here (a relative sqlite path is read from the "
                           "working directory)", store)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def read_run_file(folder: RunFolder) -> dict | None:
    path = folder.tracking_file
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists stay whole (as JSON) so a patch size is one param."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit(folder: Path | None = None) -> str:
    """The commit of the code that ran, or 'unknown' outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=folder or Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
