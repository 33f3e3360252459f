"""evaluate-seg: predictions land on the raw grid and the CSV/summary agree with an
independent scoring of the written prediction files."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medpipe.config import load_config
from medpipe.io import read_image
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import read_run_spec
from medpipe.training.segmentation import train_segmentation


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline):
    config = load_config(tiny_pipeline / "config.yaml",
                         ["tracking.enabled=false", "training.epochs=1"])
    run_dir = tiny_pipeline / "runs" / "evaluated"
    train_segmentation(config, "nnunet", 0, run_dir, restart=True, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "medpipe.cli", "evaluate-seg", "--config",
         str(tiny_pipeline / "config.yaml"), "--model", "nnunet", "--fold", "0",
         "--run-dir", str(run_dir), "--set", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean Dice" in result.stdout
    return tiny_pipeline, run_dir


def test_predictions_lie_exactly_on_the_raw_label_grid(evaluated):
    root, run_dir = evaluated
    for case_id in read_run_spec(RunFolder(run_dir)).val_cases:
        prediction = read_image(run_dir / "validation" / f"{case_id}.nii.gz")
        reference = read_image(root / "raw" / "labelsTr" / f"{case_id}.nii.gz")
        assert prediction.shape == reference.shape
        np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-5)
        assert set(np.unique(prediction.array)) <= {0, 1, 2, 3}


def test_csv_and_summary_agree_with_simpleitk_on_the_written_files(evaluated):
    root, run_dir = evaluated
    rows = list(csv.DictReader((run_dir / "evaluation" / "cases.csv").open()))
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    labels = {"CSF": 1, "grey_matter": 2, "white_matter": 3}
    assert len(rows) == summary["cases"] * len(labels)
    for row in rows:
        reference = sitk.ReadImage(str(root / "raw" / "labelsTr" / f"{row['case_id']}.nii.gz"))
        prediction = sitk.ReadImage(str(run_dir / "validation" / f"{row['case_id']}.nii.gz"))
        value = labels[row["class"]]
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(sitk.Cast(reference == value, sitk.sitkUInt8),
                        sitk.Cast(prediction == value, sitk.sitkUInt8))
        expected = overlap.GetDiceCoefficient()
        if math.isnan(float(row["dice"])):
            continue
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-9)
        voxel_ml = np.prod(reference.GetSpacing()) / 1000
        assert float(row["volume_ref_ml"]) == pytest.approx(
            sitk.GetArrayViewFromImage(reference == value).sum() * voxel_ml)
    for name in labels:
        dices = [float(r["dice"]) for r in rows if r["class"] == name]
        assert summary["classes"][name]["dice"]["mean"] == pytest.approx(np.nanmean(dices))


def test_evaluate_folder_scores_any_predictions_against_references(tmp_path):
    """The test-set scoring: files pair by name, Dice per class against the references,
    and a missing or misplaced prediction is an error naming it."""
    from helpers import make_dataset

    from medpipe.io import write_image

    root = make_dataset(tmp_path / "raw", n_cases=1, n_test=2)
    predictions = tmp_path / "predictions"
    for reference in sorted((root / "labelsTs").iterdir()):
        volume = read_image(reference)
        changed = volume.array.copy()
        changed[changed == 2] = 0  # class "two" lost, class "one" kept
        write_image(volume.with_array(changed), predictions / reference.name)
    result = subprocess.run(
        [sys.executable, "-m", "medpipe.cli", "evaluate-folder", str(root / "labelsTs"),
         str(predictions), "--dataset", str(root)], capture_output=True, encoding="utf-8",
        timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((predictions / "evaluation" / "summary.json").read_text())
    assert summary["cases"] == 2
    assert summary["classes"]["one"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["classes"]["two"]["dice"]["mean"] == pytest.approx(0.0)
    rows = list(csv.DictReader((predictions / "evaluation" / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == ["case_001", "case_001", "case_002", "case_002"]

    (predictions / "case_002.nii.gz").unlink()
    missing = subprocess.run(
        [sys.executable, "-m", "medpipe.cli", "evaluate-folder", str(root / "labelsTs"),
         str(predictions), "--dataset", str(root)], capture_output=True, encoding="utf-8",
        timeout=120)
    assert missing.returncode == 2 and "no prediction for 1 reference(s): case_002" in \
        missing.stderr
