"""The pipeline config: validated once when read (every nested section typed), and the
layering of training settings (model defaults < shared `training` < `models.<name>.training`
< `--set`), field by field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medpipe.config import PipelineConfig, TrackingConfig, load_config
from medpipe.errors import MedpipeError
from medpipe.models import model_spec


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dataset": "raw", "results": "results", **data}))
    return path


def test_training_layers_merge_field_by_field(tmp_path):
    path = write(tmp_path, {
        "training": {"epochs": 7, "optimizer": {"weight_decay": 0.5}},
        "models": {"unet": {"training": {"iterations_per_epoch": 3,
                                         "optimizer": {"lr": 0.123}}}},
    })
    config = load_config(path, ["models.unet.training.batch_size=4"])
    unet = config.training_for("unet")
    assert (unet.epochs, unet.iterations_per_epoch, unet.batch_size) == (7, 3, 4)
    defaults = model_spec("unet").optimizer_defaults  # AdamW + cosine, the model's own
    assert unet.optimizer.name == defaults.name == "adamw"
    assert unet.optimizer.schedule == "cosine"
    assert unet.optimizer.lr == 0.123 and unet.optimizer.weight_decay == 0.5
    nnunet = config.training_for("nnunet")  # only the shared layer applies to it
    assert (nnunet.epochs, nnunet.iterations_per_epoch) == (7, 250)
    assert (nnunet.optimizer.name, nnunet.optimizer.lr) == ("sgd", 0.01)
    assert nnunet.optimizer.momentum == 0.99 and nnunet.optimizer.weight_decay == 0.5


def test_native_recipe_sits_between_the_shared_settings_and_the_models_own(tmp_path):
    # the study's shared recipe: AdamW + cosine, no augmentation, a 64^3 patch for all
    shared = {"training": {"epochs": 8, "budget_samples": 1600, "augment": False,
                           "patch_size": [64, 64, 64], "optimizer": {
                               "name": "adamw", "lr": 0.001, "schedule": "cosine"}},
              "models": {"swin_unetr": {"training": {"optimizer": {"lr": 0.0005}}}}}
    config = load_config(write(tmp_path, {**shared, "recipe": "native"}))
    nnunet = config.training_for("nnunet")  # nnU-Net's own: SGD + poly, augmented, planned
    assert (nnunet.optimizer.name, nnunet.optimizer.lr, nnunet.optimizer.schedule) == (
        "sgd", 0.01, "poly")
    assert nnunet.optimizer.weight_decay == 3e-5 and nnunet.optimizer.nesterov
    assert nnunet.augment and nnunet.patch_size is None and nnunet.batch_size is None
    assert (nnunet.epochs, nnunet.budget_samples) == (8, 1600)  # the budget stays shared
    unet = config.training_for("unet")  # MONAI's spleen tutorial: Adam 1e-4, constant
    assert (unet.optimizer.name, unet.optimizer.lr, unet.optimizer.weight_decay,
            unet.optimizer.schedule) == ("adamw", 1e-4, 0.0, "constant")
    assert not unet.augment and unet.oversample_foreground == 0.5 and unet.grad_clip is None
    assert unet.patch_size == (64, 64, 64)
    swin = config.training_for("swin_unetr")  # the model's own override still wins
    assert (swin.optimizer.lr, swin.optimizer.weight_decay, swin.optimizer.schedule) == (
        0.0005, 1e-5, "constant")
    same = load_config(write(tmp_path, shared)).training_for("nnunet")  # shared: as set
    assert (same.optimizer.name, same.optimizer.schedule, same.augment,
            same.patch_size) == ("adamw", "cosine", False, (64, 64, 64))


def test_seeds_name_the_run_folders_and_resenc_trains_on_its_own_plans(tmp_path):
    config = load_config(write(tmp_path, {"seeds": [3, 4],
                                          "models": {"pyramid": {"seeds": [9]}}}))
    assert config.seeds_for("unet") == [3, 4] and config.seeds_for("pyramid") == [9]
    # the training seed decides the folder: the first seed's is fold_K
    first = load_config(write(tmp_path, {"seeds": [3, 4]}), ["training.seed=3"])
    assert first.run_folder("unet", 1).path == Path("results/runs/unet/fold_1")
    other = load_config(write(tmp_path, {"seeds": [3, 4]}), ["models.unet.training.seed=4"])
    assert other.run_folder("unet", 1).path == Path("results/runs/unet/seed_4/fold_1")
    assert other.run_folder("identity", 1).path == Path("results/runs/identity/fold_1")
    assert config.plans_file_for("nnunet") == Path("results/plans.json")
    assert config.plans_file_for("nnunet_resenc") == Path("results/plans_ResEncM.json")
    resenc_everywhere = load_config(write(tmp_path, {"planner": "ResEncL"}))
    assert resenc_everywhere.plans_file_for("nnunet_resenc") == Path("results/plans.json")
    chosen = load_config(write(tmp_path, {"models": {"nnunet_resenc": {"planner": "ResEncL"}}}))
    assert chosen.plans_file_for("nnunet_resenc") == Path("results/plans_ResEncL.json")


@pytest.mark.parametrize(("section", "message"), [
    ({"models": {"unet": {"options": {"chanels": [4, 8]}}}}, "chanels"),
    ({"models": {"vnet": {}}}, "unknown model 'vnet'"),
    ({"training": {"optimizer": {"name": "lion"}}}, "training.optimizer.name"),
    ({"models": {"unet": {"training": {"epochs": 0}}}}, "models.unet.training.epochs"),
    ({"registration": {"classical": {"demons_iterations": 0}}},
     "registration.classical.demons_iterations"),
])
def test_a_bad_nested_setting_is_refused_when_the_config_is_read(tmp_path, section, message):
    path = write(tmp_path, section)
    with pytest.raises(MedpipeError, match=message) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_init_writes_a_complete_commented_config_that_reads_back_as_the_defaults(tmp_path):
    import subprocess
    import sys

    from helpers import make_dataset

    from medpipe.config import PipelineConfig

    dataset = make_dataset(tmp_path / "raw", n_cases=2, n_channels=2, file_ending=".nrrd")
    out = tmp_path / "config.yaml"
    command = [sys.executable, "-m", "medpipe.cli", "init", str(dataset), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "channels 0: MR0, 1: MR1" in text and ".nrrd" in text
    assert "# epochs (nnU-Net: 1000 x 250 iterations)" in text
    assert "  swin_unetr:\n    options: {feature_size: 24," in text  # the model's own options
    config = load_config(out)
    expected = PipelineConfig(dataset=dataset, results="results")
    assert config.model_dump(exclude={"models"}) == expected.model_dump(exclude={"models"})
    assert set(config.models) == {"nnunet", "nnunet_resenc", "unet", "swin_unetr",
                                  "voxelmorph", "voxelmorph_diff", "pyramid"}
    for model in config.models:  # the written options and training are each model's defaults
        assert config.model_options(model) == model_spec(model).options()
        assert config.training_for(model) == expected.training_for(model)
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr  # nothing is overwritten
    assert out.read_text() == text
    missing = subprocess.run([*command[:4], str(tmp_path), "-o", str(tmp_path / "x.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "dataset.json" in missing.stderr


def test_the_default_store_belongs_to_the_results_not_the_working_directory(tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig(dataset=Path("raw"), results=Path("out/results"))
    store = config.tracking_store
    assert store.uri == f"sqlite:///{tmp_path / 'out' / 'results' / 'mlflow.db'}"
    assert store.artifact_root == tmp_path / "out" / "results" / "mlruns"
    assert store.experiment_for("Dataset001") == "Dataset001"
    # a URI named in the config or the environment is taken as it is, artifacts and all
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://host:5000")
    assert config.tracking_store.uri == "http://host:5000"
    assert config.tracking_store.artifact_root is None
    named = config.model_copy(update={"tracking": TrackingConfig(uri="sqlite:///a.db",
                                                                 experiment="e")})
    assert (named.tracking_store.uri, named.tracking_store.experiment_for("D")) == (
        "sqlite:///a.db", "e")
    off = config.model_copy(update={"tracking": TrackingConfig(enabled=False)})
    assert off.tracking_store is None
