"""Trained models on scans they never saw, in any orientation: results on the input's grid,
the registration field's ITK convention, and bad inputs refused without stray files."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medpipe import load_registrator, load_segmenter
from medpipe.config import load_config
from medpipe.errors import MedpipeError
from medpipe.io import Geometry, Volume, orientation, read_image, reorient, write_image
from medpipe.training.registration import train_registration
from medpipe.training.segmentation import train_segmentation

SCAN = "brain_000_0000.nii.gz"


def shifted(volume: Volume, codes: str, shift=(13.5, -7.0, 22.0)) -> Volume:
    """The same scan written another way: axes permuted/flipped to CODES, origin moved."""
    turned = reorient(volume, codes)
    geometry = Geometry(turned.geometry.spacing,
                        tuple(o + s for o, s in zip(turned.geometry.origin, shift, strict=True)),
                        turned.geometry.direction)
    return Volume(turned.array, geometry)


def test_prediction_lies_on_the_input_grid_in_any_orientation(segmentation_run, tiny_pipeline,
                                                              tmp_path):
    segmenter = load_segmenter(segmentation_run, device="cpu")
    scan = read_image(tiny_pipeline / "raw" / "imagesTr" / SCAN)
    reference = segmenter.predict(scan)
    assert reference.shape == scan.shape and reference.geometry == scan.geometry
    assert len(np.unique(reference.array)) > 2  # something to compare
    for codes in ("RAS", "PIR"):
        other = shifted(scan, codes)
        assert orientation(other.geometry) == codes
        path = write_image(other, tmp_path / f"{codes}.nii.gz")
        labels = segmenter.predict(path)
        assert labels.shape == other.shape
        # labels alone (restored class by class) = the argmax of the probability maps
        with_maps, maps = segmenter.predict(path, probabilities=True)
        np.testing.assert_array_equal(labels.array, with_maps.array)
        np.testing.assert_array_equal(labels.array, maps.array.argmax(-1))
        assert labels.geometry.is_close(read_image(path).geometry, atol=1e-5)
        back = reorient(labels, orientation(scan.geometry)).array
        for value in segmenter.labels.values():
            if value == 0:
                continue
            a, b = reference.array == value, back == value
            if a.sum() + b.sum():  # the axes are only permuted/flipped: exactly the same
                assert 2 * (a & b).sum() / (a.sum() + b.sum()) == 1.0


def test_same_kind_in_and_out(segmentation_run, tiny_pipeline):
    segmenter = load_segmenter(segmentation_run / "checkpoints" / "latest.pt", device="cpu")
    path = tiny_pipeline / "raw" / "imagesTr" / SCAN
    as_nib = segmenter.predict(nib.load(path))
    assert isinstance(as_nib, nib.Nifti1Image)
    np.testing.assert_allclose(as_nib.affine, nib.load(path).affine, atol=1e-5)
    image = sitk.ReadImage(str(path))
    as_sitk, probabilities = segmenter.predict(image, probabilities=True)
    assert isinstance(as_sitk, sitk.Image) and as_sitk.GetSize() == image.GetSize()
    assert as_sitk.GetOrigin() == pytest.approx(image.GetOrigin())
    assert probabilities.GetNumberOfComponentsPerPixel() == len(segmenter.labels)
    total = sitk.GetArrayFromImage(probabilities).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=1e-4)
    # the labels are the argmax of the probabilities returned with them
    np.testing.assert_array_equal(sitk.GetArrayFromImage(as_sitk),
                                  sitk.GetArrayFromImage(probabilities).argmax(-1))


def test_an_ensemble_of_folds_averages_their_probabilities(segmentation_run, tiny_pipeline):
    scan = tiny_pipeline / "raw" / "imagesTr" / SCAN
    single = load_segmenter(segmentation_run, device="cpu")
    pair = load_segmenter([segmentation_run, segmentation_run / "checkpoints" / "latest.pt"],
                          device="cpu")
    assert len(pair.networks) == 2
    _, p_best = single.predict(scan, probabilities=True)
    _, p_latest = load_segmenter(segmentation_run, "latest", "cpu").predict(scan,
                                                                             probabilities=True)
    _, p_pair = pair.predict(scan, probabilities=True)
    np.testing.assert_allclose(p_pair.array, (p_best.array + p_latest.array) / 2, atol=1e-5)


def test_registration_outputs_follow_the_itk_convention(registration_run, tiny_pipeline):
    registrator = load_registrator(registration_run, device="cpu")
    raw = tiny_pipeline / "raw"
    moving = sitk.ReadImage(str(raw / "imagesTr" / "brain_002_0000.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(raw / "imagesTr" / "brain_001_0000.nii.gz"), sitk.sitkFloat32)
    labels = raw / "labelsTr" / "brain_002.nii.gz"
    result = registrator.register(moving, fixed, moving_labels=labels)
    for image in (result.warped, result.field, result.warped_labels):
        assert image.GetSize() == fixed.GetSize()
        assert image.GetOrigin() == pytest.approx(fixed.GetOrigin())
        assert image.GetDirection() == pytest.approx(fixed.GetDirection())
    expected = sitk.Resample(moving, fixed,
                             sitk.DisplacementFieldTransform(sitk.Image(result.field)),
                             sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped),
                               sitk.GetArrayFromImage(expected), atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(result.warped_labels))) <= {0, 1, 2, 3}


def test_refined_registration_matches_the_fixed_scan_better(registration_run, tiny_pipeline):
    """Instance optimisation through the public API: the field changes, still on the fixed
    grid, and the warped scan correlates better with the fixed one (what it optimises)."""
    raw = tiny_pipeline / "raw" / "imagesTr"
    moving, fixed = raw / "brain_002_0000.nii.gz", raw / "brain_001_0000.nii.gz"
    plain = load_registrator(registration_run, device="cpu").register(moving, fixed)
    refined = load_registrator(registration_run, device="cpu", refine_steps=20).register(
        moving, fixed)
    assert refined.field.shape == plain.field.shape
    assert not np.allclose(refined.field.array, plain.field.array)
    target = read_image(fixed).array.ravel()

    def correlation(result) -> float:
        return float(np.corrcoef(result.warped.array.ravel(), target)[0, 1])

    assert correlation(refined) > correlation(plain)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_predicts_a_folder_and_registers_a_pair(segmentation_run, registration_run,
                                                    tiny_pipeline, tmp_path):
    images = tiny_pipeline / "raw" / "imagesTr"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("brain_003_0000.nii.gz", "brain_004_0000.nii.gz"):
        (folder / name).write_bytes((images / name).read_bytes())
    result = run_cli("predict", "--model", str(segmentation_run), "-i", str(folder),
                     "-o", str(tmp_path / "out"), "--device", "cpu", "--probabilities")
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["brain_003.nii.gz", "brain_003_probabilities.nii.gz",
                       "brain_004.nii.gz", "brain_004_probabilities.nii.gz"]
    labels = read_image(tmp_path / "out" / "brain_003.nii.gz")
    scan = read_image(folder / "brain_003_0000.nii.gz")
    assert labels.shape == scan.shape and labels.geometry.is_close(scan.geometry, 1e-6)
    maps = read_image(tmp_path / "out" / "brain_003_probabilities.nii.gz")
    assert maps.array.shape == (*scan.shape, 4) and maps.array.dtype == np.float32
    assert maps.geometry.is_close(scan.geometry, 1e-6)
    np.testing.assert_allclose(maps.array.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(maps.array.argmax(-1), labels.array)
    result = run_cli("register", "--model", str(registration_run), "--moving",
                     str(images / "brain_002_0000.nii.gz"), "--fixed",
                     str(images / "brain_001_0000.nii.gz"), "-o", str(tmp_path / "reg"),
                     "--moving-labels",
                     str(tiny_pipeline / "raw" / "labelsTr" / "brain_002.nii.gz"),
                     "--refine-steps", "5", "--refine-spacing", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == \
        ["field.nii.gz", "warped.nii.gz", "warped_labels.nii.gz"]
    field = sitk.ReadImage(str(tmp_path / "reg" / "field.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3


def test_bad_inputs_are_refused_clearly(segmentation_run, registration_run, tiny_pipeline,
                                        tmp_path):
    scan = read_image(tiny_pipeline / "raw" / "imagesTr" / SCAN)
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([scan.array] * 2, -1), scan.affine), four_d)
    two_d = tmp_path / "two_d.nii.gz"
    nib.save(nib.Nifti1Image(scan.array[:, :, 5], scan.affine), two_d)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((tiny_pipeline / "raw" / "imagesTr" / SCAN).read_bytes()[:200])
    no_model = tmp_path / "not_a_model"
    no_model.mkdir()
    cases = [
        (["--model", str(segmentation_run), "-i", str(four_d)], "4D"),
        (["--model", str(segmentation_run), "-i", str(two_d)], "2D"),
        (["--model", str(segmentation_run), "-i", str(broken)], "broken.nii.gz"),
        (["--model", str(no_model), "-i", str(tiny_pipeline / "raw" / "imagesTr" / SCAN)],
         "model.json"),
    ]
    for args, expected in cases:
        out = tmp_path / "out.nii.gz"
        result = run_cli("predict", *args, "-o", str(out), "--device", "cpu")
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    import shutil

    for missing in ("plans.json", "checkpoints/best.pt"):
        broken_model = tmp_path / f"without_{missing.replace('/', '_')}"
        shutil.copytree(segmentation_run, broken_model)
        (broken_model / missing).unlink()
        with pytest.raises(MedpipeError, match=r"plans\.json|checkpoint 'best'"):
            load_segmenter(broken_model, device="cpu")
    segmenter = load_segmenter(segmentation_run, device="cpu")
    with pytest.raises(MedpipeError, match="1 channel"):
        segmenter.predict([scan, scan])
    with pytest.raises(MedpipeError, match="registration model"):
        load_segmenter(registration_run)
    with pytest.raises(MedpipeError, match="model not found"):
        load_segmenter(tmp_path / "nowhere")


def test_logged_model_loads_from_the_registry_by_alias(tiny_pipeline, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = load_config(tiny_pipeline / "config.yaml",
                         [f"tracking.uri={uri}", "training.epochs=1",
                          "training.iterations_per_epoch=1"])
    run_dir = train_segmentation(config, "unet", 0, tmp_path / "unet", progress=False)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = __import__("json").loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    model_id = client.get_run(run_id).data.tags["model_id"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test's load may have left another store set
    version = mlflow.register_model(f"models:/{model_id}", "brain_tissue_unet")
    client.set_registered_model_alias("brain_tissue_unet", "champion", version.version)

    scan = tiny_pipeline / "raw" / "imagesTr" / SCAN
    direct = load_segmenter(run_dir, device="cpu").predict(scan)
    from_registry = load_segmenter("models:/brain_tissue_unet@champion", device="cpu")
    np.testing.assert_array_equal(from_registry.predict(scan).array, direct.array)

    pyfunc = mlflow.pyfunc.load_model("models:/brain_tissue_unet@champion")
    out = tmp_path / "pyfunc" / "brain_000.nii.gz"
    answer = pyfunc.predict(pd.DataFrame({"image": [str(scan)], "output": [str(out)]}))
    assert list(answer["output"]) == [str(out)]
    np.testing.assert_array_equal(read_image(out).array, direct.array)


def test_logged_registration_model_runs_through_pyfunc(tiny_pipeline, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = load_config(tiny_pipeline / "config.yaml", [
        f"tracking.uri={uri}", "training.epochs=1", "training.iterations_per_epoch=1",
        "training.batch_size=1", "registration.atlas=brain_001",
        "models.voxelmorph.options.channels=[8,16,16,16]",
        "models.voxelmorph.options.final_conv_channels=[8]"])
    run_dir = train_registration(config, "voxelmorph", 0, tmp_path / "vxm", progress=False)
    run_id = __import__("json").loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    model_id = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["model_id"]

    images = tiny_pipeline / "raw" / "imagesTr"
    moving, fixed = images / "brain_002_0000.nii.gz", images / "brain_001_0000.nii.gz"
    direct = load_registrator(run_dir, device="cpu").register(moving, fixed)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
    answer = pyfunc.predict(pd.DataFrame({"moving": [str(moving)], "fixed": [str(fixed)],
                                          "output": [str(tmp_path / "out")]}))
    assert list(answer["output"]) == [str(tmp_path / "out")]
    # (two runs of SimpleITK's threaded affine agree to ~1e-6, not bit for bit)
    np.testing.assert_allclose(read_image(tmp_path / "out" / "warped.nii.gz").array,
                               direct.warped.array, rtol=1e-4, atol=1e-4)
    assert read_image(tmp_path / "out" / "field.nii.gz").array.shape[-1] == 3


def test_predictions_never_overwrite_an_input(tmp_path):
    from medpipe.inference.files import plan_predictions

    scan = write_image(Volume(np.zeros((4, 4, 4), np.float32), Geometry((1, 1, 1), (0, 0, 0))),
                       tmp_path / "scans" / "brain.nii.gz")
    with pytest.raises(MedpipeError, match="overwrite an input"):
        plan_predictions(scan, scan, 1)  # -o equal to -i
    with pytest.raises(MedpipeError, match="overwrite an input"):
        plan_predictions(scan.parent, scan.parent, 1)  # brain.nii.gz -> brain.nii.gz
    assert plan_predictions(scan.parent, tmp_path / "out", 1) == [
        ([scan], tmp_path / "out" / "brain.nii.gz")]


def test_a_run_scores_the_labelled_test_cases_as_it_scores_its_validation_cases(
        segmentation_run, tiny_pipeline, tmp_path):
    # repeated runs pair on the test set: `--cases test` scores imagesTs/labelsTs (their
    # preprocessed arrays) into the run's evaluation_test/; a validation case renamed as a
    # test case must score exactly as it did in validation
    import csv
    import shutil

    from medpipe.evaluation.segmentation import evaluate_segmentation

    raw, results = tmp_path / "raw", tmp_path / "results"
    shutil.copytree(tiny_pipeline / "raw", raw)
    shutil.copytree(tiny_pipeline / "results", results)
    # scoring writes into the run folder: a copy, the session's run stays as trained
    run = tmp_path / "run"
    shutil.copytree(segmentation_run, run)
    config = load_config(tiny_pipeline / "config.yaml", [
        f"dataset={raw}", f"results={results}", "tracking.enabled=false"])
    validation = evaluate_segmentation(config, "unet", 0, run, device="cpu")
    case = read_model(run).val_cases[0]
    for folder in ("imagesTs", "labelsTs"):
        (raw / folder).mkdir(exist_ok=True)
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTs" / "t0_0000.nii.gz")
    shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", raw / "labelsTs" / "t0.nii.gz")
    for suffix in (".npz", ".json"):
        shutil.copy(config.preprocessed_dir / f"{case}{suffix}",
                    config.preprocessed_dir / f"t0{suffix}")
    test = evaluate_segmentation(config, "unet", 0, run, device="cpu",
                                 cases="test")
    assert test["scored"] == "test" and test["cases"] == 1
    assert (run / "test" / "t0.nii.gz").is_file()

    def dice(path, case_id):
        with open(path, newline="", encoding="utf-8") as f:
            return {r["class"]: float(r["dice"]) for r in csv.DictReader(f)
                    if r["case_id"] == case_id}

    assert dice(run / "evaluation_test" / "cases.csv", "t0") == pytest.approx(
        dice(run / "evaluation" / "cases.csv", case), abs=1e-6)
    assert validation["scored"] == "validation"


def read_model(run_dir):
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec

    return read_run_spec(RunFolder(run_dir))
