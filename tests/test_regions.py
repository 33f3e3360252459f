"""Region-based labels as nnU-Net trains them (BraTS-style nested regions), on a
two-channel NRRD dataset: one sigmoid output per region, scored per region, labels rebuilt
from the regions in `regions_class_order`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import BIN, as_user, assert_no_traceback_in_logs, run_workflow

from medpipe.config import load_config
from medpipe.data import load_dataset, make_splits, write_splits
from medpipe.data.demo import DemoSettings, build_demo_dataset
from medpipe.data.labels import LabelScheme
from medpipe.evaluation.segmentation import evaluate_segmentation
from medpipe.io import read_image, write_image
from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans
from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset
from medpipe.training.segmentation import train_segmentation

REGIONS = {"background": 0, "brain": [1, 2, 3], "tissue": [2, 3], "white_matter": [3]}


def test_regions_turn_back_into_labels_in_their_order():
    scheme = LabelScheme.from_labels(REGIONS, [1, 2, 3])
    assert scheme.regions and scheme.out_channels == 3
    label = np.array([0, 1, 2, 3, 3])
    masks = scheme.region_masks(label)
    np.testing.assert_array_equal(masks.astype(int), [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1],
                                                      [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(scheme.labels_from_regions(list(masks)), label)
    plain = LabelScheme.from_labels({"background": 0, "a": 1, "b": 2})
    assert not plain.regions and plain.out_channels == 3


def write_region_dataset(demo: Path, raw: Path) -> None:
    """DEMO (the demo brains, NIfTI) rewritten into RAW as two-channel NRRD with nested
    regions: a dataset in another format with BraTS-style labels."""
    for path in sorted(demo.rglob("*.nii.gz")):
        target = raw / path.relative_to(demo).parent / path.name.replace(".nii.gz", ".nrrd")
        volume = read_image(path)
        write_image(volume, target)
        if target.name.endswith("_0000.nrrd"):  # a second channel: a T2-like inversion
            inverted = volume.with_array(np.where(volume.array > 0, volume.array.max()
                                                  - volume.array, 0).astype(np.float32))
            write_image(inverted, target.with_name(target.name.replace("_0000", "_0001")))
    spec = json.loads((demo / "dataset.json").read_text())
    spec.update(labels=REGIONS, regions_class_order=[1, 2, 3], file_ending=".nrrd",
                channel_names={"0": "T1", "1": "T2"})
    (raw / "dataset.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def region_pipeline(tmp_path_factory):
    """The tiny demo brains rewritten as two-channel NRRD with nested regions, planned and
    preprocessed."""
    root = tmp_path_factory.mktemp("regions")
    demo = build_demo_dataset(root / "demo", DemoSettings(cases=5, test_cases=0, spacing=6.0,
                                                          seed=3))
    raw = root / "raw"
    write_region_dataset(demo, raw)
    results = root / "results"
    plans = plan_experiment(fingerprint_dataset(raw), 8)
    stages = plans.configuration("3d_fullres").architecture.arch_kwargs.n_stages
    write_plans(plans.with_features("3d_fullres", (8, 16, 32, 64)[:stages]),
                results / "plans.json")
    dataset = load_dataset(raw)
    write_splits(make_splits(dataset.case_ids, 5, 12345), results / "splits.json")
    preprocess_dataset(dataset.training, PreprocessingPlan.from_plans(plans),
                       results / "preprocessed" / "3d_fullres", [1, 2, 3])
    (root / "config.yaml").write_text(yaml.safe_dump({
        "dataset": str(raw), "results": str(results), "tracking": {"enabled": False},
        "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "val_every": 1,
                     "num_workers": 0, "patch_size": [32, 32, 32]},
        "models": {"unet": {"options": {"channels": [8, 16, 32], "strides": [2, 2],
                                        "num_res_units": 1}}}}))
    return root


def test_region_training_evaluation_and_inference(region_pipeline, tmp_path):
    config = load_config(region_pipeline / "config.yaml")
    run_dir = train_segmentation(config, "unet", 0, tmp_path / "unet", progress=False)
    history = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["history"]
    assert {"val_dice_1", "val_dice_2", "val_dice_3"} <= set(history[-1])
    summary = evaluate_segmentation(config, "unet", 0, run_dir, device="cpu")
    assert list(summary["classes"]) == ["brain", "tissue", "white_matter"]

    # per region, the CSV's Dice is that of the written prediction against the raw labels
    rows = list(csv.DictReader((run_dir / "evaluation" / "cases.csv").open()))
    raw = region_pipeline / "raw"
    for row in rows:
        prediction = read_image(run_dir / "validation" / f"{row['case_id']}.nrrd").array
        reference = read_image(raw / "labelsTr" / f"{row['case_id']}.nrrd").array
        assert set(np.unique(prediction)) <= {0, 1, 2, 3}
        values = REGIONS[row["class"]]
        p, r = np.isin(prediction, values), np.isin(reference, values)
        expected = 2 * np.sum(p & r) / (p.sum() + r.sum()) if p.sum() + r.sum() else np.nan
        assert float(row["dice"]) == pytest.approx(expected, nan_ok=True)

    from medpipe import load_segmenter

    scan = [raw / "imagesTr" / f"{rows[0]['case_id']}_{c:04d}.nrrd" for c in (0, 1)]
    labels, probabilities = load_segmenter(run_dir, device="cpu").predict(scan,
                                                                            probabilities=True)
    assert labels.shape == read_image(scan[0]).shape
    assert probabilities.array.shape == (*labels.shape, 3)  # one channel per region
    masks = torch.from_numpy(probabilities.array > 0.5).movedim(-1, 0).numpy()
    scheme = LabelScheme.from_labels(REGIONS, [1, 2, 3])
    np.testing.assert_array_equal(labels.array, scheme.labels_from_regions(list(masks)))


@pytest.mark.slow
def test_a_users_region_dataset_goes_from_init_to_report_and_test_predictions(tmp_path):
    """As a new user: `medpipe init` on their own NRRD region dataset, the written config
    edited to one small segmentation model and no registration, then `snakemake all`: the
    report, the test set's predictions and their scores, and no traceback in any log."""
    demo = build_demo_dataset(tmp_path / "demo", DemoSettings(cases=4, test_cases=2,
                                                              spacing=6.0, seed=4))
    write_region_dataset(demo, tmp_path / "raw")
    run = as_user(tmp_path)
    run(str(BIN / "medpipe"), "init", "raw", "-o", "config.yaml")
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    config.update(segmentation_models=["unet"], train_folds=[0], folds=2)
    config["registration"].update(models=[], baselines=[])
    config["training"].update(epochs=2, iterations_per_epoch=2, batch_size=2, val_every=1,
                              num_workers=0, patch_size=[32, 32, 32])
    config["models"]["unet"]["options"].update(channels=[8, 16, 32], strides=[2, 2],
                                               num_res_units=1)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_workflow(run)

    results = tmp_path / "results"
    report = (results / "compare" / "report.md").read_text(encoding="utf-8")
    # scored on the test set (the fold ensemble's predictions), regions named as declared
    assert "| ★ unet |" in report and "Dice white matter" in report
    assert "## Segmentation (test set, n = 2 cases)" in report
    test = results / "test" / "unet"
    test_ids = sorted(p.name[: -len(".nrrd")] for p in (tmp_path / "raw" / "labelsTs").iterdir())
    assert sorted(p.name for p in (test / "predictions").glob("*.nrrd")) == [
        f"{case}.nrrd" for case in test_ids]
    scored = json.loads((test / "evaluation" / "summary.json").read_text())
    assert list(scored["classes"]) == ["brain", "tissue", "white_matter"]
    assert_no_traceback_in_logs(results)
