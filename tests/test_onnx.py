"""ONNX export: one `.onnx` file per fold carries the network and its plans, and onnxruntime
gives the torch backend's labels on the scan's own grid."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_medpipe

from medpipe import load_segmenter
from medpipe.config import load_config
from medpipe.errors import MedpipeError
from medpipe.inference.onnx_backend import export_onnx
from medpipe.io import read_image
from medpipe.training.segmentation import train_segmentation

SCAN = "brain_000_0000.nii.gz"


@pytest.fixture(scope="module")
def nnunet_run(tiny_pipeline, tmp_path_factory):
    """nnU-Net's network (deep supervision: several outputs while training), 2 steps."""
    config = load_config(tiny_pipeline / "config.yaml", [
        "tracking.enabled=false", "training.epochs=1", "training.iterations_per_epoch=2",
        "training.augment=false"])
    return train_segmentation(config, "nnunet", 0, tmp_path_factory.mktemp("seg") / "nnunet",
                              progress=False)


@pytest.mark.parametrize("run", ["segmentation_run", "nnunet_run"])
def test_onnxruntime_labels_equal_torch_float32(run, request, tiny_pipeline, tmp_path):
    run_dir = request.getfixturevalue(run)
    scan = tiny_pipeline / "raw" / "imagesTr" / SCAN
    exported = run_medpipe("export", str(run_dir), "-o", str(tmp_path / "model.onnx"))
    assert exported.returncode == 0, exported.stderr
    predicted = run_medpipe("predict", "--model", str(tmp_path / "model.onnx"), "--backend",
                        "onnxruntime", "-i", str(scan), "-o", str(tmp_path / "onnx.nii.gz"),
                        "--probabilities")
    assert predicted.returncode == 0, predicted.stderr
    torch_fp32 = load_segmenter(run_dir, device="cpu", amp=False)
    labels, probabilities = torch_fp32.predict(str(scan), probabilities=True)
    onnx_labels = read_image(tmp_path / "onnx.nii.gz")
    assert onnx_labels.geometry == labels.geometry  # the scan's own grid
    assert np.array_equal(onnx_labels.array, labels.array)
    assert len(np.unique(labels.array)) > 1  # not an empty answer on both sides
    onnx_maps = read_image(tmp_path / "onnx_probabilities.nii.gz").array
    np.testing.assert_allclose(onnx_maps, probabilities.array, atol=1e-4)
    # the file alone is the model: its description and plans travel inside it
    from_file = load_segmenter(tmp_path / "model.onnx", backend="onnxruntime")
    assert from_file.spec == torch_fp32.spec and from_file.plans == torch_fp32.plans
    assert from_file.dtype is None  # fp32: what onnxruntime computes on a CPU


def test_a_registration_network_exports_with_its_transform(registration_run, tiny_pipeline,
                                                           tmp_path):
    from medpipe import load_registrator

    raw = tiny_pipeline / "raw" / "imagesTr"
    moving, fixed = raw / "brain_002_0000.nii.gz", raw / "brain_001_0000.nii.gz"
    exported = run_medpipe("export", str(registration_run), "-o", str(tmp_path / "reg.onnx"))
    assert exported.returncode == 0, exported.stderr
    registered = run_medpipe("register", "--model", str(tmp_path / "reg.onnx"), "--backend",
                         "onnxruntime", "--moving", str(moving), "--fixed", str(fixed),
                         "-o", str(tmp_path / "out"))
    assert registered.returncode == 0, registered.stderr
    expected = load_registrator(registration_run, device="cpu", amp=False).register(
        str(moving), str(fixed))
    field, reference = read_image(tmp_path / "out" / "field.nii.gz"), expected.field
    assert field.geometry == reference.geometry
    assert np.abs(reference.array).max() > 0.01  # the network moves something
    np.testing.assert_allclose(field.array, reference.array, atol=1e-3)  # mm
    with pytest.raises(MedpipeError, match="use load_registrator"):
        load_segmenter(tmp_path / "reg.onnx", backend="onnxruntime")


def test_export_and_backend_mistakes_are_named(segmentation_run, tiny_pipeline, tmp_path):
    with pytest.raises(MedpipeError, match=r"must end in \.onnx"):
        export_onnx(segmentation_run, tmp_path / "model.pt")
    with pytest.raises(MedpipeError, match="export one fold"):
        export_onnx([segmentation_run, segmentation_run], tmp_path / "two.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(MedpipeError, match=r"runs a \.onnx file"):
        load_segmenter(segmentation_run, backend="onnxruntime")
    (tmp_path / "fake.onnx").write_bytes(b"not a model")
    with pytest.raises(MedpipeError, match="runs with --backend onnxruntime"):
        load_segmenter(tmp_path / "fake.onnx")
    result = run_medpipe("predict", "--model", str(tmp_path / "fake.onnx"), "--backend",
                     "onnxruntime", "-i", str(tiny_pipeline / "raw" / "imagesTr" / SCAN),
                     "-o", str(tmp_path / "out.nii.gz"))
    assert result.returncode != 0 and "fake.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.nii.gz").exists()
