"""nnU-Net's postprocessing: the largest component kept only where cross-validation says it
helps, decided as nnU-Net v2's `determine_postprocessing` does, applied by `predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medpipe.data.labels import LabelScheme
from medpipe.errors import MedpipeError
from medpipe.postprocessing import determine_postprocessing, keep_largest, read_postprocessing

SCHEME = LabelScheme.from_labels({"background": 0, "a": 1, "b": 2})


def _cases(spurious_a: bool, second_b: bool, n: int = 4):
    """References: a big cube of 1 and a cube of 2 (two cubes where SECOND_B); predictions:
    the references, plus a stray blob of 1 far away where SPURIOUS_A."""
    predictions, references = [], []
    for index in range(n):
        reference = np.zeros((30, 30, 30), np.uint8)
        reference[4:14, 4:14, 4:14] = 1
        reference[16:22, 16:22, 16:22] = 2
        if second_b:
            reference[2:5, 24:27, 24:27] = 2
        prediction = reference.copy()
        prediction[5, 5, 5] = 0  # not perfect: Dice < 1 but unchanged by the step
        if spurious_a:
            prediction[25:28, 2:5, 2 + index:5 + index] = 1
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def test_keep_largest_against_an_independent_labelling():
    rng = np.random.default_rng(0)
    labels = (rng.random((20, 20, 20)) > 0.7).astype(np.uint8) * rng.integers(1, 3, (20,) * 3)
    kept = keep_largest(labels, [1])
    components, _ = ndimage.label(labels == 1, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    assert int((kept == 1).sum()) == sizes.max()
    assert np.array_equal(kept == 2, labels == 2)  # other classes untouched
    assert set(np.unique(kept)) <= set(np.unique(labels))


def test_a_stray_blob_is_removed_and_a_true_second_component_kept():
    predictions, references = _cases(spurious_a=True, second_b=True)
    decision = determine_postprocessing(predictions, references, SCHEME)
    # the whole-foreground step would delete b's true second cube: b gets worse, refused
    assert not decision.foreground_largest_component
    assert decision.largest_component_classes == ("a",)
    assert decision.dice_after["a"] > decision.dice_before["a"]
    assert decision.dice_after["b"] == decision.dice_before["b"]
    cleaned = decision.apply(predictions[0])
    assert not cleaned[25:28, 2:5, 2:5].any() and (cleaned[2:5, 24:27, 24:27] == 2).all()


def test_nothing_is_chosen_when_nothing_helps():
    predictions, references = _cases(spurious_a=False, second_b=False)
    decision = determine_postprocessing(predictions, references, SCHEME)
    assert not decision.foreground_largest_component
    assert decision.largest_component_classes == ()
    assert np.array_equal(decision.apply(predictions[1]), predictions[1])


def test_a_broken_postprocessing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps({"foreground_largest_component": "maybe"}))
    with pytest.raises(MedpipeError, match="not a medpipe postprocessing file") as raised:
        read_postprocessing(path)
    assert raised.value.path == path


def test_predict_applies_the_decision(segmentation_run, tmp_path):
    """A decision file that keeps the largest component of every class: `predict
    --postprocessing` writes exactly the plain prediction with that applied."""
    from medpipe.io import read_image
    from medpipe.postprocessing import Postprocessing
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    spec = read_run_spec(RunFolder(segmentation_run))
    classes = spec.label_scheme.classes
    decision = Postprocessing(foreground_largest_component=False,
                              largest_component_classes=tuple(classes), class_values=classes,
                              cases=0, dice_before={}, dice_after={})
    (tmp_path / "pp.json").write_text(decision.model_dump_json())
    raw = Path(json.loads((segmentation_run / "config.json").read_text())["dataset"])
    image = str(sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0])
    outputs = {}
    for name, extra in (("plain", []), ("post", ["--postprocessing", str(tmp_path / "pp.json")])):
        result = subprocess.run([sys.executable, "-m", "medpipe.cli", "predict", "--model",
                                 str(segmentation_run), "-i", image, "-o",
                                 str(tmp_path / f"{name}.nii.gz"), *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = read_image(tmp_path / f"{name}.nii.gz").array
    assert np.array_equal(outputs["post"], decision.apply(outputs["plain"]))
