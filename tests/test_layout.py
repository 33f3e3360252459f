"""nnU-Net v2 layout parsing and cross-validation splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_dataset

from medpipe.data import load_dataset, make_splits, read_splits, write_splits
from medpipe.data.layout import read_spec, scan_dataset
from medpipe.errors import DatasetError


def test_multichannel_cases_pair_channels_in_order(tmp_path):
    root = make_dataset(tmp_path, n_cases=3, n_channels=2, n_test=1)
    dataset = load_dataset(root)
    assert dataset.case_ids == ["case_000", "case_001", "case_002"]
    case = dataset.case("case_001")
    assert [p.name for p in case.images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert case.label.name == "case_001.nii.gz"
    assert [c.case_id for c in dataset.test] == ["case_003"]
    assert dataset.spec.label_values == {0, 1, 2}


def test_other_file_endings_are_read_from_dataset_json(tmp_path):
    dataset = load_dataset(make_dataset(tmp_path, n_cases=2, file_ending=".mha"))
    assert dataset.training[0].images[0].suffix == ".mha"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"labels": {"background": 0}}), "channel_names"),
        (
            json.dumps(
                {
                    "channel_names": {"1": "T1"},
                    "labels": {"background": 0},
                    "numTraining": 1,
                    "file_ending": ".nii.gz",
                }
            ),
            "keys must be '0'",
        ),
        (
            json.dumps(
                {
                    "channel_names": {"0": "T1"},
                    "labels": {"tumour": 1},
                    "numTraining": 1,
                    "file_ending": ".nii.gz",
                }
            ),
            "background",
        ),
        (
            json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": []}),
            "nnU-Net v1",
        ),
    ],
)
def test_invalid_dataset_json_names_the_file_and_field(tmp_path, content, message):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as caught:
        read_spec(tmp_path)
    assert str(tmp_path / "dataset.json") in str(caught.value)


def test_region_labels_contribute_all_members(tmp_path):
    root = make_dataset(tmp_path, n_cases=2)
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    spec["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(spec))
    assert read_spec(root).label_values == {0, 1, 2}


def test_orphans_and_missing_channels_are_all_reported(tmp_path):
    root = make_dataset(tmp_path, n_cases=3, n_channels=2)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (root / "labelsTr" / "ghost.nii.gz").write_bytes(b"")
    _, problems = scan_dataset(root)
    found = {(p.check, p.file.name) for p in problems}
    assert ("image_without_label", "case_000_0000.nii.gz") in found
    assert ("missing_channel", "case_001_0001.nii.gz") in found
    assert ("label_without_image", "ghost.nii.gz") in found
    with pytest.raises(DatasetError, match="3 layout problem"):
        load_dataset(root)


def test_unlabelled_scans_are_listed_apart_and_may_not_reuse_a_case_id(tmp_path):
    import shutil

    root = make_dataset(tmp_path, n_cases=3)
    extra = root / "imagesTrUnlabelled"
    extra.mkdir()
    shutil.copy(root / "imagesTr" / "case_000_0000.nii.gz", extra / "scan_a_0000.nii.gz")
    dataset = load_dataset(root)
    assert [c.case_id for c in dataset.unlabelled] == ["scan_a"]
    assert dataset.unlabelled[0].label is None
    assert dataset.case_ids == ["case_000", "case_001", "case_002"]  # splits never see it
    shutil.copy(root / "imagesTr" / "case_001_0000.nii.gz", extra / "case_001_0000.nii.gz")
    dataset, problems = scan_dataset(root)
    assert [(p.check, p.file.name) for p in problems] == [
        ("duplicate_case", "case_001_0000.nii.gz")]
    assert [c.case_id for c in dataset.unlabelled] == ["scan_a"]


def test_splits_follow_nnunet_kfold_rule():
    """Independent re-derivation: sklearn's KFold shuffles with RandomState(seed).shuffle."""
    ids = [f"c{i:02d}" for i in range(11)]
    splits = make_splits(list(reversed(ids)), n_folds=5)
    order = np.arange(len(ids))
    np.random.RandomState(12345).shuffle(order)
    sizes = [3, 2, 2, 2, 2]  # the first n % k folds take one more
    start = 0
    for split, size in zip(splits, sizes, strict=True):
        expected_val = sorted(ids[i] for i in order[start : start + size])
        assert sorted(split["val"]) == expected_val
        assert sorted(split["train"] + split["val"]) == ids
        start += size
    all_val = [c for s in splits for c in s["val"]]
    assert sorted(all_val) == ids  # every case validated exactly once


def test_splits_round_trip_and_reject_impossible_folds(tmp_path):
    splits = make_splits(["a", "b", "c", "d"], n_folds=2)
    assert read_splits(write_splits(splits, tmp_path / "splits.json")) == splits
    with pytest.raises(DatasetError, match="cannot make 5 folds from 4"):
        make_splits(["a", "b", "c", "d"], n_folds=5)
