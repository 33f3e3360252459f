import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

# tiny networks so that a training step takes well under a second on two CPU cores
TINY_FEATURES = [8, 16, 32, 64]
TINY_MODELS = {
    "unet": {"options": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
    "swin_unetr": {
        "options": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
        # Swin-UNETR's literature lr (1e-4) barely moves in a dozen steps
        # (64^3 is its smallest patch: one sample per step keeps it quick on a CPU)
        "training": {"patch_size": [64, 64, 64], "batch_size": 1, "optimizer": {"lr": 1e-3}},
    },
    "nnunet": {},
}


@pytest.fixture(autouse=True)
def mlflow_environment():
    """`mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI into os.environ, where every later
    test's subprocesses would find it (a dead test server, say): restore it after each test."""
    import os

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A real preprocessed dataset (5 demo brains at 6 mm, planned and preprocessed by
    medpipe) and a pipeline config that trains tiny nets on it for a few iterations.

    The plans' features are shrunk to TINY_FEATURES, as a user would edit plans.json to
    make nnU-Net's network smaller; `nnunet` must follow them."""
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_pipeline(root, {"uri": f"sqlite:///{root / 'mlflow.db'}",
                                      "experiment": "tiny"})


def build_tiny_pipeline(root: Path, tracking: dict, test_cases: int = 0) -> Path:
    """ROOT/raw (5 demo brains at 6 mm and TEST_CASES test brains), ROOT/results (plans
    with TINY_FEATURES, splits, the training cases preprocessed) and ROOT/config.yaml."""
    from medpipe.data import load_dataset, make_splits, write_splits
    from medpipe.data.demo import DemoSettings, build_demo_dataset
    from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans
    from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset

    raw = root / "raw"
    build_demo_dataset(raw, DemoSettings(cases=5, test_cases=test_cases, spacing=6.0, seed=3))
    results = root / "results"
    plans = plan_experiment(fingerprint_dataset(raw), 8)
    stages = plans.configuration("3d_fullres").architecture.arch_kwargs.n_stages
    plans = plans.with_features("3d_fullres", tuple(TINY_FEATURES[:stages]))
    write_plans(plans, results / "plans.json")
    dataset = load_dataset(raw)
    write_splits(make_splits(dataset.case_ids, 5, 12345), results / "splits.json")
    classes = sorted(v for v in dataset.spec.label_values if v > 0)
    preprocess_dataset(
        dataset.training, PreprocessingPlan.from_plans(plans), results / "preprocessed" /
        "3d_fullres", classes,
    )
    config = {
        "dataset": str(raw),
        "results": str(results),
        "training": {
            "epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "val_every": 1,
            "num_workers": 0, "patch_size": [32, 32, 32],
        },
        "models": TINY_MODELS,
        "tracking": tracking,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="session")
def segmentation_run(tiny_pipeline, tmp_path_factory):
    """A unet trained for a few steps on the tiny pipeline (weights barely matter: the
    tests check geometry, files and refusals). One for the session: a test that writes
    into a run folder copies it first."""
    from medpipe.config import load_config
    from medpipe.training.segmentation import train_segmentation

    config = load_config(tiny_pipeline / "config.yaml",
                         ["tracking.enabled=false", "training.epochs=2",
                          "training.iterations_per_epoch=4", "training.augment=false"])
    return train_segmentation(config, "unet", 0, tmp_path_factory.mktemp("seg") / "unet",
                              progress=False)


@pytest.fixture(scope="session")
def registration_run(tiny_pipeline, tmp_path_factory):
    """A small voxelmorph trained for two steps on the tiny pipeline, registering to an
    atlas (its folds hold too few validation cases for pairs)."""
    from medpipe.config import load_config
    from medpipe.training.registration import train_registration

    config = load_config(tiny_pipeline / "config.yaml", [
        "tracking.enabled=false", "training.epochs=1", "training.iterations_per_epoch=2",
        "training.batch_size=1", "registration.atlas=brain_001",
        "models.voxelmorph.options.channels=[8,16,16,16]",
        "models.voxelmorph.options.final_conv_channels=[8]"])
    return train_registration(config, "voxelmorph", 0,
                              tmp_path_factory.mktemp("reg") / "voxelmorph", progress=False)


def read_json(path):
    return json.loads(Path(path).read_text())
