"""`medpipe verify`: every problem at once, each naming its file, the dataset untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from helpers import make_dataset, tree_digest

from medpipe.data.verify import verify_dataset
from medpipe.io import Volume, read_image, write_image


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medpipe.cli", *args],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )


@pytest.fixture
def broken_dataset(tmp_path):
    """Five cases; four carry one defect each, the fifth is clean."""
    root = make_dataset(tmp_path / "ds", n_cases=5)
    image = root / "imagesTr" / "case_000_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:400])  # truncated download

    nan_path = root / "imagesTr" / "case_001_0000.nii.gz"
    volume = read_image(nan_path)
    array = volume.array.copy()
    array[1, 2, 3] = np.nan
    write_image(Volume(array, volume.geometry), nan_path)

    label_path = root / "labelsTr" / "case_002.nii.gz"
    label = read_image(label_path)
    bad = label.array.copy()
    bad[0, 0, 0] = 7
    write_image(Volume(bad, label.geometry), label_path)

    shifted_path = root / "labelsTr" / "case_003.nii.gz"
    label = read_image(shifted_path)
    origin = tuple(np.add(label.geometry.origin, [2.0, 0.0, 0.0]))
    write_image(Volume(label.array, replace(label.geometry, origin=origin)), shifted_path)
    return root


def test_clean_dataset_passes(tmp_path):
    root = make_dataset(tmp_path, n_cases=3, n_channels=2, n_test=1)
    report = verify_dataset(root)
    assert report.ok, report.problems
    assert (report.n_training, report.n_test) == (3, 1)
    result = run_cli("verify", str(root))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_four_defects_are_listed_together(broken_dataset):
    report = verify_dataset(broken_dataset)
    found = {(p.check, p.file.name) for p in report.errors}
    assert found == {
        ("unreadable", "case_000_0000.nii.gz"),
        ("non_finite_voxels", "case_001_0000.nii.gz"),
        ("undeclared_label", "case_002.nii.gz"),
        ("geometry_mismatch", "case_003.nii.gz"),
    }
    messages = {p.check: p.message for p in report.errors}
    assert "1 NaN" in messages["non_finite_voxels"]
    assert "7 (1 voxels)" in messages["undeclared_label"]
    assert "origin" in messages["geometry_mismatch"]


def test_cli_lists_all_exits_nonzero_and_modifies_nothing(broken_dataset, tmp_path):
    before = tree_digest(broken_dataset)
    report_path = tmp_path / "report.json"
    result = run_cli("verify", str(broken_dataset), "--json", str(report_path))

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    for name in ["case_000_0000.nii.gz", "case_001_0000.nii.gz", "case_002.nii", "case_003.nii"]:
        assert name in output
    assert "4 error(s)" in result.stderr
    assert tree_digest(broken_dataset) == before

    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["n_errors"] == 4
    assert {p["check"] for p in report["problems"]} >= {"unreadable", "geometry_mismatch"}


def test_parallel_workers_find_the_same_problems(broken_dataset):
    serial = verify_dataset(broken_dataset, workers=1).problems
    parallel = verify_dataset(broken_dataset, workers=2).problems
    assert parallel == serial


def test_broken_dataset_json_does_not_hide_other_problems(broken_dataset):
    (broken_dataset / "dataset.json").write_text("{ truncated")
    report = verify_dataset(broken_dataset)
    checks = {p.check for p in report.errors}
    assert {"dataset_json", "unreadable", "non_finite_voxels", "geometry_mismatch"} <= checks
    # label values cannot be judged without the declared labels
    assert "undeclared_label" not in checks


def test_layout_shape_and_dimension_problems(tmp_path):
    root = make_dataset(tmp_path, n_cases=4, n_channels=2)
    (root / "imagesTr" / "case_000_0001.nii.gz").unlink()
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    image = read_image(root / "imagesTr" / "case_002_0001.nii.gz")
    write_image(
        Volume(image.array[:-1], image.geometry), root / "imagesTr" / "case_002_0001.nii.gz"
    )
    four_d = np.zeros((*image.shape, 2), np.float32)
    write_image(Volume(four_d, image.geometry), root / "imagesTr" / "case_003_0000.nii.gz")
    spec = json.loads((root / "dataset.json").read_text())
    spec["numTraining"] = 9
    (root / "dataset.json").write_text(json.dumps(spec))

    found = {(p.check, p.file.name) for p in verify_dataset(root).errors}
    assert found == {
        ("missing_channel", "case_000_0001.nii.gz"),
        ("image_without_label", "case_001_0000.nii.gz"),
        ("shape_mismatch", "case_002_0001.nii.gz"),
        ("not_3d", "case_003_0000.nii.gz"),
        ("num_training_mismatch", "dataset.json"),
    }


def test_missing_folder_is_a_clean_error():
    result = run_cli("verify", "/nonexistent/dataset")
    assert result.returncode == 2
    assert "error:" in result.stderr and "/nonexistent/dataset" in result.stderr
    assert "Traceback" not in result.stderr
