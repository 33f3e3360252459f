"""Registration networks on the shared engine: recovery of a known warp, exact resume, the
evaluation of every method through the ITK field, and the commands."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from contextlib import ExitStack

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_fields import smooth_ddf

from medpipe.config import RegistrationConfig, load_config
from medpipe.errors import MedpipeError
from medpipe.evaluation.registration import evaluate_registration
from medpipe.io import Geometry
from medpipe.metrics import deformation_metrics, jacobian_determinant
from medpipe.models import NetworkShape, build_model
from medpipe.registration.fields import ddf_to_field
from medpipe.registration.loss import RegistrationLoss
from medpipe.registration.pairs import PairDataset, RegistrationCase, pair_arrays, resize_image
from medpipe.runs.folder import RunFolder
from medpipe.runs.spec import read_run_spec
from medpipe.spatial import warp
from medpipe.training.engine import EngineSettings, Trainer
from medpipe.training.optim import build_optimizer, build_scheduler
from medpipe.training.registration import (
    RegistrationTask,
    ValidationPair,
    train_registration,
)

ATLAS = "brain_001"  # a training case of fold 0 in the tiny pipeline (the validation case
# of fold 0, brain_000 or the like, is registered to it)
TINY_VXM = ["models.voxelmorph.options.channels=[8,16,16,16]",
            "models.voxelmorph.options.final_conv_channels=[8]",
            "models.voxelmorph_diff.options.channels=[8,16,16,16]",
            "models.voxelmorph_diff.options.final_conv_channels=[8]",
            f"registration.atlas={ATLAS}", "training.batch_size=1"]


def textured_image(shape, seed=0) -> np.ndarray:
    """Smoothed noise inside a ball: texture everywhere a field must be recovered."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.standard_normal(shape), 2.0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    ball = (np.sum(grid**2, axis=0) < 0.8).astype(float)
    return ((texture / texture.std()) * ball + 2.0 * ball).astype(np.float32)


KNOWN_WARP_SHAPE = (32, 32, 32)


def known_warp(iterations: int) -> tuple[np.ndarray, PairDataset, ValidationPair]:
    """A textured image and its warp by a known smooth u (fixed(x) = moving(x + u(x)), 2 mm
    voxels): (u, a dataset of that one pair, the pair for validation)."""
    shape = KNOWN_WARP_SHAPE
    geometry = Geometry(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    truth = smooth_ddf(shape, amplitude=2.0)
    moving_image = textured_image(shape)
    fixed_image = warp(torch.from_numpy(moving_image)[None, None],
                       torch.from_numpy(truth)[None], padding_mode="border")[0].numpy()
    labels = np.zeros(shape, np.int64)
    moving = RegistrationCase("moving", moving_image[None], labels, geometry)
    fixed = RegistrationCase("fixed", fixed_image, labels, geometry)
    dataset = PairDataset([moving, fixed], None, shape, batch_size=1, iterations=iterations,
                          seed=0, atlas=fixed)
    pair = ValidationPair("moving", "fixed", shape, pair_arrays(moving, fixed, np.eye(4), shape))
    return truth, dataset, pair


def test_a_batch_of_pairs_is_resampled_on_the_device_as_scipy_resamples_one():
    """The loader only pads; `onto_fixed_grid` resamples a whole batch with torch. Against
    scipy's `affine_transform` (an independent implementation; "grid-constant": within a
    voxel of the moving grid's edge, points blend towards the fill value, where scipy's
    "constant" would jump to it), for cases on different
    grids and a rotation + scaling + shift between them: images within float error,
    labels equal but where a point falls halfway between two voxels."""
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    from medpipe.registration.pairs import onto_fixed_grid, padded_pair

    rng = np.random.default_rng(0)
    moving_image = textured_image((20, 18, 16), seed=1)
    labels = (moving_image > 2.3).astype(np.int64) + (moving_image > 3.0)
    moving = RegistrationCase("m", moving_image[None], labels,
                              Geometry(spacing=(2.0, 2.2, 2.5), origin=(3.0, -4.0, 1.0)))
    fixed = RegistrationCase("f", textured_image((18, 20, 14), seed=2)[None],
                             np.zeros((18, 20, 14), np.int64),
                             Geometry(spacing=(2.1, 2.0, 2.4), origin=(0.0, 0.0, 0.0)))
    shape = (22, 22, 18)
    batch, expected = [], []
    for _ in range(2):
        matrix = np.eye(4)
        matrix[:3, :3] = Rotation.from_rotvec(rng.normal(0, 0.1, 3)).as_matrix() * 1.05
        matrix[:3, 3] = rng.normal(0, 2.0, 3)
        arrays = padded_pair(moving, fixed, matrix, shape)
        batch.append(arrays)
        voxel_map = arrays["voxel_map"].astype(np.float64)
        linear, offset = voxel_map[:3, :3], voxel_map[:3, 3]
        expected.append((
            affine_transform(moving_image, linear, offset, output_shape=shape, order=1,
                             mode="grid-constant", cval=float(moving_image.min())),
            affine_transform(labels, linear, offset, output_shape=shape, order=0,
                             mode="grid-constant", cval=0)))
    stacked = {k: torch.stack([torch.from_numpy(a[k]) for a in batch]) for k in batch[0]}
    images, moved_labels = onto_fixed_grid(stacked["moving"], stacked["moving_labels"],
                                           stacked["voxel_map"])
    assert images.shape == (2, 1, *shape) and moved_labels.dtype == torch.int64
    for index, (image, label) in enumerate(expected):
        assert np.abs(images[index, 0].numpy() - image).max() < 1e-4
        assert (moved_labels[index, 0].numpy() != label).mean() < 1e-3
        assert len(np.unique(label)) == 3


def end_point_error(net, pair: ValidationPair, truth: np.ndarray) -> tuple[np.ndarray, float,
                                                                              float]:
    """The trained NET's field on PAIR, and its mean end-point error and the mean |u| (voxels)
    inside the ball where the image has texture."""
    net.eval()
    with torch.no_grad():
        _, ddf = net(torch.from_numpy(pair.arrays["moving"])[None],
                     torch.from_numpy(pair.arrays["fixed"])[None])
    ddf = ddf[0].numpy()
    inside = np.sum(np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in truth.shape[1:]],
                                         indexing="ij")) ** 2, axis=0) < 0.5
    error = np.linalg.norm(ddf - truth, axis=0)[inside].mean()
    magnitude = np.linalg.norm(truth, axis=0)[inside].mean()
    print(f"recovered warp: end-point error {error:.3f} voxels, |u| {magnitude:.3f} voxels")
    return ddf, float(error), float(magnitude)


def test_network_recovers_a_known_warp_and_its_jacobian_matches_itk(tmp_path):
    """fixed(x) = moving(x + u(x)) for a known smooth u: training on that pair must bring
    the predicted field close to u (the error is stated in the assertion message)."""
    geometry = Geometry(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    truth, dataset, pair = known_warp(iterations=50)
    settings = RegistrationConfig(similarity="mse", regularisation=0.05)
    task = RegistrationTask(dataset, [pair], RegistrationLoss(settings, n_classes=2))
    torch.manual_seed(0)
    net = build_model("voxelmorph", NetworkShape(1, 3, {}),
                      {"channels": [16, 32, 32, 32], "final_conv_channels": [16]})
    optimizer_settings = {"name": "adamw", "lr": 3e-3, "schedule": "constant"}
    from medpipe.training_settings import OptimizerConfig

    optimizer = build_optimizer(net, OptimizerConfig(**optimizer_settings))
    scheduler = build_scheduler(optimizer, OptimizerConfig(**optimizer_settings), 300)
    Trainer(net, task, optimizer, scheduler,
            EngineSettings(epochs=6, iterations_per_epoch=50, val_every=6),
            tmp_path / "checkpoints").fit()

    ddf, error, magnitude = end_point_error(net, pair, truth)
    assert error < 0.4 * magnitude, f"end-point error {error:.3f} vs |u| {magnitude:.3f} voxels"

    # our Jacobian (and so folding and SDlogJ) against ITK's own, of the exported field
    det = jacobian_determinant(ddf)
    itk = sitk.GetArrayFromImage(
        sitk.DisplacementFieldJacobianDeterminant(ddf_to_field(ddf, geometry))
    ).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3  # ITK and numpy treat the border differently
    np.testing.assert_allclose(det[inner], itk[inner], atol=1e-4)
    metrics = deformation_metrics(ddf)
    assert metrics["sdlogj"] == pytest.approx(float(np.std(np.log(np.clip(det, 1e-9, 1e9)))))
    assert metrics["folding_percent"] == pytest.approx(100 * np.mean(det <= 0))


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    """voxelmorph_diff trained for 2 x 3 pairs on the tiny brains, to the atlas."""
    run_dir = tmp_path_factory.mktemp("reg") / "voxelmorph_diff"
    config = load_config(tiny_pipeline / "config.yaml",
                         [*TINY_VXM, "training.epochs=2", "training.iterations_per_epoch=3"])
    train_registration(config, "voxelmorph_diff", 0, run_dir, progress=False)
    return config, run_dir


def test_training_writes_a_complete_run_folder(trained):
    _, run_dir = trained
    spec = read_run_spec(RunFolder(run_dir))
    assert spec.task == "registration"
    assert spec.reference_case == ATLAS
    assert all(n % 4 == 0 for n in spec.grid_shape)  # 4 levels: divisor 2^2
    assert spec.classical.deformable == "none"  # the pre-alignment is affine only
    prealign = json.loads((run_dir / "prealign.json").read_text())
    assert np.allclose(prealign["matrices"][ATLAS], np.eye(4))
    assert set(prealign["matrices"]) == {*spec.train_cases, *spec.val_cases}
    summary = json.loads((run_dir / "training.json").read_text())
    assert summary["epochs"] == 2 and summary["parameters"] > 0
    history = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["history"]
    assert "val_dice_1" in history[-1] and "val_folding_percent" in history[-1]
    assert (run_dir / "figures" / "validation_registration.png").stat().st_size > 0
    assert (run_dir / "figures" / "learning_curve.png").is_file()


def test_resumed_training_is_identical(tiny_pipeline, tmp_path, monkeypatch):
    # no pre-alignment: two separate runs' SimpleITK affines agree only to ~1e-7 mm (ITK's
    # threaded sums), while a resumed run reuses its stored prealign.json, so only the
    # engine's resume is compared here
    config = load_config(tiny_pipeline / "config.yaml",
                         [*TINY_VXM, "tracking.enabled=false", "training.epochs=2",
                          "training.iterations_per_epoch=2", "registration.prealign=none"])
    straight = train_registration(config, "voxelmorph", 0, tmp_path / "straight",
                                  progress=False)

    class Crash(Exception):
        pass

    save = Trainer._save

    def save_then_crash(self, improved):  # dies right after epoch 1 is checkpointed
        save(self, improved)
        if self.epoch == 1:
            raise Crash

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(Crash):
        train_registration(config, "voxelmorph", 0, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(Trainer, "_save", save)
    train_registration(config, "voxelmorph", 0, tmp_path / "resumed", progress=False)
    a = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "latest.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b["model"][key]), key


@pytest.mark.parametrize("method", ["identity", "classical", "voxelmorph_diff"])
def test_every_method_is_scored_on_the_fixed_raw_grid(trained, tiny_pipeline, method,
                                                      tmp_path):
    _, network_dir = trained
    config = load_config(tiny_pipeline / "config.yaml",
                         [*TINY_VXM, "registration.classical.demons_iterations=10"])
    run_dir = network_dir if method == "voxelmorph_diff" else tmp_path / method
    summary = evaluate_registration(config, method, 0, run_dir, device="cpu")
    assert summary["pairs"] == 1 and summary["method"] == method
    rows = list(csv.DictReader((run_dir / "evaluation" / "pairs.csv").open()))
    assert [r["class"] for r in rows] == ["CSF", "grey_matter", "white_matter"]
    assert all(r["fixed"] == ATLAS for r in rows)
    dice = [float(r["dice"]) for r in rows]
    assert all(0 <= d <= 1 for d in dice)
    assert summary["mean_dice"]["mean"] == pytest.approx(np.mean(dice))
    # Learn2Reg's HD95 in voxels: on the isotropic 6 mm tiny brains, exactly mm / 6
    for row in rows:
        assert float(row["hd95_voxels"]) * 6.0 == pytest.approx(float(row["hd95"]), nan_ok=True)
    assert summary["dice30"] == pytest.approx(summary["mean_dice"]["mean"])  # one pair
    if method == "identity":
        assert summary["folding_percent"]["mean"] == 0 and summary["sdlogj"]["mean"] == 0
    else:
        assert summary["folding_percent"]["mean"] < 1.0
    figures = list((run_dir / "evaluation").glob(f"{method}_*.png"))
    assert len(figures) == 1


def test_classical_beats_identity_on_the_same_pairs(trained, tmp_path):
    config, _ = trained
    identity = evaluate_registration(config, "identity", 0, tmp_path / "identity")
    classical = evaluate_registration(config, "classical", 0, tmp_path / "classical")
    assert classical["mean_dice"]["mean"] > identity["mean_dice"]["mean"] + 0.05


@pytest.fixture(scope="module")
def brains_3mm(tmp_path_factory):
    """Two demo brains at 3 mm: ANTsPy's SyN pyramid (shrink 4, fixed) needs more voxels
    than the 6 mm tiny brains have."""
    from medpipe.data.demo import DemoSettings, build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("brains3") / "raw",
                              DemoSettings(cases=2, test_cases=0, spacing=3.0, seed=2))


def test_ants_scores_above_identity_through_the_same_field_and_labels(brains_3mm):
    from medpipe.evaluation.registration import _baseline
    from medpipe.io import read_image
    from medpipe.metrics import segmentation_metrics
    from medpipe.registration.fields import warp_with_field

    def case(case_id):
        image = read_image(brains_3mm / "imagesTr" / f"{case_id}_0000.nii.gz")
        labels = read_image(brains_3mm / "labelsTr" / f"{case_id}.nii.gz")
        # normalised as preprocessing leaves it: a negative background, which once sent
        # ANTsPy's centre-of-mass start outside the image
        array = (image.array - image.array.mean()) / image.array.std()
        return RegistrationCase(case_id, array[None].astype(np.float32), labels.array,
                                image.geometry), labels

    (moving, moving_labels), (fixed, fixed_labels) = case("brain_000"), case("brain_001")
    settings = RegistrationConfig()
    dice = {}
    with ExitStack() as resources:
        for method in ("identity", "ants"):
            field = _baseline(method, settings, resources)(moving, fixed, fixed_labels)
            warped = warp_with_field(moving_labels, field, labels=True)
            scores = segmentation_metrics(warped.array, fixed_labels.array,
                                          {"CSF": 1, "GM": 2, "WM": 3}, fixed_labels.spacing)
            dice[method] = np.mean([s["dice"] for s in scores.values()])
    assert dice["ants"] > dice["identity"] + 0.1, dice


ANTS_APPLY = """
import sys, ants, numpy as np
ants.config.set_ants_deterministic(True)
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
# registered as medpipe hands them over: each image shifted to start at 0
result = ants.registration(fixed - fixed.min(), moving - moving.min(),
                           type_of_transform="SyN", random_seed=0)
np.save(sys.argv[3], ants.apply_transforms(fixed, moving, result["fwdtransforms"]).numpy())
"""


def test_the_ants_field_warps_as_ants_itself_and_is_reproduced(brains_3mm, tmp_path):
    """ANTs' transforms read back into one field: resampling through it gives exactly what
    `ants.apply_transforms` gives (run by ANTsPy itself), and deterministic runs agree."""
    from medpipe.io import read_image
    from medpipe.registration.ants_baseline import AntsRegistration, ants_python
    from medpipe.registration.classical import displacement_field
    from medpipe.registration.fields import warp_with_field

    images = brains_3mm / "imagesTr"
    fixed_path, moving_path = images / "brain_001_0000.nii.gz", images / "brain_000_0000.nii.gz"
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    with AntsRegistration() as ants:
        fields = [displacement_field(ants(fixed, moving), fixed) for _ in range(2)]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fields[0]),
                                  sitk.GetArrayFromImage(fields[1]))
    script = tmp_path / "apply.py"
    script.write_text(ANTS_APPLY)
    subprocess.run([str(ants_python()), str(script), str(fixed_path), str(moving_path),
                    str(tmp_path / "ants.npy")], check=True, timeout=300)
    ours = warp_with_field(moving, fields[0]).array
    np.testing.assert_allclose(ours, np.load(tmp_path / "ants.npy"), atol=1e-4)


def test_a_missing_ants_environment_is_named(monkeypatch, tmp_path):
    from medpipe.registration.ants_baseline import AntsRegistration

    monkeypatch.setenv("MEDPIPE_ANTS_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(MedpipeError, match=r"nowhere.*names no Python"):
        AntsRegistration()


def test_subject_to_subject_needs_two_validation_cases(tiny_pipeline, tmp_path):
    # fold 0 of the tiny pipeline holds one validation case: no held-out pair exists
    config = load_config(tiny_pipeline / "config.yaml",
                         [*TINY_VXM, "registration.atlas=null", "tracking.enabled=false"])
    with pytest.raises(MedpipeError, match="atlas"):
        train_registration(config, "voxelmorph", 0, tmp_path / "run", progress=False)


def test_cli_train_and_evaluate(tiny_pipeline, tmp_path):
    """`train-reg` then `evaluate-reg` on the run it wrote, as a user (or a rule) calls them;
    a segmentation model given to `train-reg` is a one-line error."""
    base = [sys.executable, "-m", "medpipe.cli"]
    config = str(tiny_pipeline / "config.yaml")
    run_dir = tmp_path / "vxm"
    sets = [f"--set={s}" for s in [*TINY_VXM, "tracking.enabled=false", "training.epochs=1",
                                   "training.iterations_per_epoch=1"]]
    trained = subprocess.run(
        [*base, "train-reg", "--config", config, "--model", "voxelmorph", "--run-dir",
         str(run_dir), *sets], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert str(run_dir) in trained.stdout
    assert json.loads((run_dir / "training.json").read_text())["epochs"] == 1
    result = subprocess.run(
        [*base, "evaluate-reg", "--config", config, "--model", "voxelmorph",
         "--run-dir", str(run_dir), *sets], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean Dice" in result.stdout and "s/pair" in result.stdout
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    assert summary["method"] == "voxelmorph" and summary["pairs"] == 1
    wrong = subprocess.run(
        [*base, "train-reg", "--config", config, "--model", "unet", "--run-dir",
         str(tmp_path / "x"), *sets], capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0
    assert "unet" in wrong.stderr and "registration" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_resize_image_is_scipy_zoom_with_grid_mode_at_a_factor_of_two(factor):
    # the torch resampling onto a network's grid against scipy's (what it replaced)
    from scipy.ndimage import zoom

    image = np.random.default_rng(0).random((2, 20, 16, 12), dtype=np.float32)
    shape = tuple(int(n * factor) for n in image.shape[1:])
    ours = resize_image(image, shape)
    theirs = np.stack([zoom(c, factor, order=1, mode="nearest", grid_mode=True) for c in image])
    assert ours.shape == theirs.shape == (2, *shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_moments_prealignment_matches_the_centres_of_mass_and_composes_exactly():
    from scipy.ndimage import center_of_mass, shift

    from medpipe.registration.pairs import moments_matrix, pair_matrix, prealign

    geometry = Geometry(spacing=(2.0, 1.5, 3.0), origin=(10.0, -5.0, 7.0),
                        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    base = textured_image((24, 20, 16), seed=3) - 1.0  # negative background, as normalised
    cases = [RegistrationCase(f"c{k}", shift(base, offset, order=1, mode="nearest")[None],
                              np.zeros(base.shape, np.int64), geometry)
             for k, offset in enumerate([(0, 0, 0), (2, -1, 1), (-1, 3, -2)])]
    for moving, fixed in [(cases[1], cases[0]), (cases[2], cases[1])]:
        matrix = moments_matrix(moving, fixed)
        expected = [np.asarray(center_of_mass(c.image[0] - c.image[0].min()))
                    for c in (moving, fixed)]
        linear = geometry.affine_lps[:3, :3]
        np.testing.assert_allclose(matrix[:3, 3], linear @ (expected[0] - expected[1]),
                                   atol=1e-5)  # scipy sums in float32
        np.testing.assert_array_equal(matrix[:3, :3], np.eye(3))
    matrices = prealign(cases, cases[0], mode="moments")
    np.testing.assert_allclose(pair_matrix(matrices, "c2", "c1"),
                               moments_matrix(cases[2], cases[1]), atol=1e-9)


def test_instance_optimisation_starts_from_the_prediction_and_recovers_a_warp():
    """Zero steps return the network's field exactly (the refinement composes with it); from
    a zero prediction, 40 steps on a pair with a known smooth warp recover most of it, with
    no folding (the refinement is a flow's exponential)."""
    from monai.networks.blocks import Warp

    from medpipe.config import InstanceOptimisationSettings
    from medpipe.registration.instance_optimisation import instance_optimise

    shape = (32, 32, 32)
    truth = smooth_ddf(shape, amplitude=2.0)
    moving = torch.from_numpy(textured_image(shape))[None, None]
    fixed = Warp("bilinear", "border")(moving, torch.from_numpy(truth)[None])
    loss = RegistrationLoss(RegistrationConfig(similarity="mse", regularisation=0.05), 2)
    predicted = torch.from_numpy(smooth_ddf(shape, amplitude=1.0)[::-1].copy())[None]
    unchanged = instance_optimise(predicted, moving, fixed, loss,
                                  InstanceOptimisationSettings(steps=0))
    torch.testing.assert_close(unchanged, predicted, atol=1e-6, rtol=0)

    refined = instance_optimise(torch.zeros(1, 3, *shape), moving, fixed, loss,
                                InstanceOptimisationSettings(steps=40, lr=0.2))[0].numpy()
    inside = np.sum(np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape],
                                         indexing="ij")) ** 2, axis=0) < 0.5
    error = np.linalg.norm(refined - truth, axis=0)[inside].mean()
    magnitude = np.linalg.norm(truth, axis=0)[inside].mean()
    assert error < 0.5 * magnitude, f"end-point error {error:.3f} vs |u| {magnitude:.3f} voxels"
    assert deformation_metrics(refined)["folding_percent"] == 0


def test_a_refined_network_is_scored_as_its_own_method(trained, tiny_pipeline, tmp_path):
    config, network_dir = trained
    network = evaluate_registration(config, "voxelmorph_diff", 0, network_dir, device="cpu")
    before = {p.name: p.stat().st_mtime_ns for p in (network_dir / "evaluation").iterdir()}
    refined = evaluate_registration(config, "voxelmorph_diff_io", 0, tmp_path / "io",
                                    device="cpu", network_dir=network_dir)
    assert refined["method"] == "voxelmorph_diff_io" and refined["pairs"] == 1
    assert (tmp_path / "io" / "evaluation" / "pairs.csv").is_file()
    # the network's own folder is only read
    assert {p.name: p.stat().st_mtime_ns
            for p in (network_dir / "evaluation").iterdir()} == before
    # the refinement optimises image similarity on a pair the network saw once: it must
    # not lose Dice, and it adds no folding of its own
    assert refined["mean_dice"]["mean"] >= network["mean_dice"]["mean"] - 0.01
    assert refined["folding_percent"]["mean"] <= network["folding_percent"]["mean"] + 0.01
    # on a finer grid of its own (the prediction resampled onto it): the same guarantees
    finer = load_config(tiny_pipeline / "config.yaml",
                        [*TINY_VXM, "registration.instance_optimisation.spacing=[4,4,4]"])
    on_finer = evaluate_registration(finer, "voxelmorph_diff_io", 0, tmp_path / "io4",
                                     device="cpu", network_dir=network_dir)
    assert on_finer["mean_dice"]["mean"] >= network["mean_dice"]["mean"] - 0.01
    assert on_finer["folding_percent"]["mean"] <= network["folding_percent"]["mean"] + 0.01
    assert on_finer["mean_dice"]["mean"] != refined["mean_dice"]["mean"]  # it ran there
    without = load_config(tiny_pipeline / "config.yaml",
                          [*TINY_VXM, "registration.instance_optimisation.steps=0"])
    with pytest.raises(MedpipeError, match=r"instance_optimisation\.steps > 0"):
        evaluate_registration(without, "voxelmorph_diff_io", 0, tmp_path / "io0",
                              network_dir=network_dir)


def test_inverse_consistency_is_zero_for_an_exact_inverse_and_adds_up_otherwise():
    """A field and its exact inverse compose to the identity; a shift and the same shift
    again (not its inverse) miss by twice the shift, everywhere."""
    from medpipe.evaluation.registration import inverse_consistency
    from medpipe.registration.fields import physical_points, to_itk_field

    shape = (20, 22, 18)
    geometry = Geometry(spacing=(2.0, 2.0, 2.0), origin=(-20.0, -22.0, -18.0))
    points = physical_points(geometry, shape)
    matrix = np.array([[1.04, 0.03, 0.0], [-0.02, 0.97, 0.01], [0.0, 0.02, 1.02]])
    shift = np.array([1.5, -0.5, 0.8])
    forward = np.einsum("rc,c...->r...", matrix - np.eye(3), points) + shift[:, None, None, None]
    inverse = np.linalg.inv(matrix)
    backward = (np.einsum("rc,c...->r...", inverse - np.eye(3), points)
                - (inverse @ shift)[:, None, None, None])
    mask = np.zeros(shape, bool)
    mask[5:15, 5:17, 5:13] = True  # well inside, where the composed points stay on the grid
    mean, p95 = inverse_consistency(to_itk_field(forward, geometry),
                                    to_itk_field(backward, geometry), mask)
    assert mean < 1e-6 and p95 < 1e-6
    constant = np.broadcast_to(shift[:, None, None, None], (3, *shape))
    mean, p95 = inverse_consistency(to_itk_field(constant, geometry),
                                    to_itk_field(constant, geometry), mask)
    assert mean == pytest.approx(2 * np.linalg.norm(shift)) and p95 == pytest.approx(mean)


def test_evaluation_pairs_use_every_case_evenly_then_every_ordered_pair():
    from medpipe.registration.pairs import evaluation_pairs

    ids = ["a", "b", "c", "d"]
    first = evaluation_pairs(ids, None, 4)  # one round: each case moved once, fixed once
    assert sorted(m for m, _ in first) == ids and sorted(f for _, f in first) == ids
    assert all(m != f for m, f in first)
    everything = evaluation_pairs(ids, None, 100)
    assert sorted(everything) == sorted((m, f) for m in ids for f in ids if m != f)
    assert evaluation_pairs(ids, "b", 100) == [("a", "b"), ("c", "b"), ("d", "b")]


def test_registration_is_scored_on_test_pairs_when_asked(tiny_pipeline, tmp_path):
    """eval_cases=test: `preprocess --case` takes the labelled test cases, and every method
    is scored on their pairs alone, tagged so in MLflow for the report."""
    from medpipe.data.demo import DemoSettings, build_demo_dataset
    from medpipe.tracking import finished_runs

    raw = tmp_path / "raw"
    build_demo_dataset(raw, DemoSettings(cases=3, test_cases=2, spacing=6.0, seed=3))
    results = tmp_path / "results"
    plans = tiny_pipeline / "results" / "plans.json"
    preprocessed = results / "preprocessed" / "3d_fullres"
    command = [sys.executable, "-m", "medpipe.cli", "preprocess", str(raw), str(plans),
               "-o", str(preprocessed), "--case", "brain_003", "--case", "brain_004"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert sorted(p.name for p in preprocessed.glob("*.npz")) == ["brain_003.npz",
                                                                   "brain_004.npz"]
    (results / "plans.json").write_bytes(plans.read_bytes())
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(tiny_pipeline / "config.yaml", [
        f"dataset={raw}", f"results={results}", "registration.eval_cases=test",
        f"tracking.uri={store}"])
    summary = evaluate_registration(config, "identity", 0, tmp_path / "identity")
    rows = list(csv.DictReader((tmp_path / "identity" / "evaluation" / "pairs.csv").open()))
    assert summary["pairs"] == 2
    assert {(r["moving"], r["fixed"]) for r in rows} == {("brain_003", "brain_004"),
                                                          ("brain_004", "brain_003")}
    [run] = finished_runs(config.tracking_store.uri, "tiny")
    assert run.tags["eval_cases"] == "test"

    unknown = subprocess.run([*command[:-4], "--case", "brain_009"], capture_output=True,
                             text=True)
    assert unknown.returncode != 0 and "labelled test case(s) brain_009" in unknown.stderr


def test_test_pairs_need_labelled_test_cases(tiny_pipeline):
    config = load_config(tiny_pipeline / "config.yaml", ["registration.eval_cases=test",
                                                         "tracking.enabled=false"])
    with pytest.raises(MedpipeError, match="0 labelled test case"):
        evaluate_registration(config, "identity", 0, None)


def test_unlabelled_pairs_add_image_terms_only_and_labelled_pairs_weigh_the_same():
    torch.manual_seed(0)
    loss = RegistrationLoss(RegistrationConfig(dice_weight=2.0), n_classes=3)
    fixed, warped = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    ddf = torch.randn(2, 3, 8, 8, 8) * 0.5
    moving_labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    fixed_labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    labelled = torch.tensor([True, False])
    mixed = loss(warped, fixed, ddf, moving_labels, fixed_labels, labelled)
    # the labelled pair's Dice, computed alone, at its half share of the batch
    first = loss(warped[:1], fixed[:1], ddf[:1], moving_labels[:1], fixed_labels[:1])
    dice_first = first - loss.image_terms(warped[:1], fixed[:1], ddf[:1])
    expected = loss.image_terms(warped, fixed, ddf) + 0.5 * dice_first
    assert float(dice_first) > 0.1
    assert float(mixed) == pytest.approx(float(expected), rel=1e-6)
    none = loss(warped, fixed, ddf, moving_labels, fixed_labels, torch.tensor([False, False]))
    assert float(none) == pytest.approx(float(loss.image_terms(warped, fixed, ddf)), rel=1e-6)


def test_networks_train_on_unlabelled_scans_too(tiny_pipeline, tmp_path):
    """imagesTrUnlabelled: `demo-data --unlabelled` writes it, `verify` counts it,
    `preprocess` prepares it, and a registration run pairs its scans (without a Dice term)
    beside the fold's training cases; segmentation and the splits never see it."""
    from medpipe.data import load_dataset, make_splits, write_splits
    from medpipe.training.registration import registration_setup

    raw = tmp_path / "raw"
    cli = [sys.executable, "-m", "medpipe.cli"]
    subprocess.run([*cli, "demo-data", str(raw), "--cases", "4", "--test-cases", "0",
                    "--unlabelled", "2", "--spacing", "6", "--seed", "3"], check=True,
                   capture_output=True)
    assert sorted(p.name for p in (raw / "imagesTrUnlabelled").iterdir()) == [
        "brain_004_0000.nii.gz", "brain_005_0000.nii.gz"]
    verified = subprocess.run([*cli, "verify", str(raw)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert "4 training and 0 test case(s), 2 unlabelled" in " ".join(verified.stdout.split())
    dataset = load_dataset(raw)
    assert dataset.case_ids == ["brain_000", "brain_001", "brain_002", "brain_003"]
    assert [c.case_id for c in dataset.unlabelled] == ["brain_004", "brain_005"]

    results = tmp_path / "results"
    (results).mkdir()
    (results / "plans.json").write_bytes((tiny_pipeline / "results" / "plans.json").read_bytes())
    preprocessed = results / "preprocessed" / "3d_fullres"
    subprocess.run([*cli, "preprocess", str(raw), str(results / "plans.json"), "-o",
                    str(preprocessed)], check=True, capture_output=True)
    assert len(list(preprocessed.glob("*.npz"))) == 6
    write_splits(make_splits(dataset.case_ids, n_folds=2), results / "splits.json")
    config = load_config(tiny_pipeline / "config.yaml", [
        *TINY_VXM, f"dataset={raw}", f"results={results}", "registration.atlas=null",
        "registration.prealign=moments", "tracking.enabled=false", "training.epochs=1",
        "training.iterations_per_epoch=8"])
    setup = registration_setup(config, "voxelmorph", 0, tmp_path / "run")
    assert setup.spec.unlabelled_cases == ("brain_004", "brain_005")
    prealign = json.loads((tmp_path / "run" / "prealign.json").read_text())
    assert {"brain_004", "brain_005"} <= set(prealign["matrices"])
    dataset = setup.task.dataset
    dataset.set_epoch(0)
    items = [dataset[i] for i in range(30)]  # 1 pair in 6 is of two labelled cases
    unlabelled = [item for item in items if not item["labelled"]]
    assert unlabelled and len(unlabelled) < len(items)
    assert all(int(item["moving_labels"].max()) == 0 for item in unlabelled)
    assert all(int(item["moving_labels"].max()) > 0 for item in items if item["labelled"])
    # the run trains through them, and without them it is a different run
    train_registration(config, "voxelmorph", 0, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "training.json").read_text())["skipped_steps"] == 0
    without = load_config(tiny_pipeline / "config.yaml", [
        *TINY_VXM, f"dataset={raw}", f"results={results}", "registration.atlas=null",
        "registration.unlabelled=false", "tracking.enabled=false"])
    assert registration_setup(without, "voxelmorph", 0, tmp_path / "other").spec.run_hash \
        != setup.spec.run_hash
