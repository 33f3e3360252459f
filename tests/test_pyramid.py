"""The coarse-to-fine registration network: its correlation against a direct computation,
the identity at initialisation, float32 geometry under bf16, its affine stage (a known affine
fitted, composed exactly, exempt from the smoothness penalty, exported to ONNX), a known warp
recovered, the inverse-consistency term, and a run through training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_registration import end_point_error, known_warp

from medpipe.config import RegistrationConfig, load_config
from medpipe.errors import MedpipeError
from medpipe.evaluation.registration import evaluate_registration
from medpipe.models import NetworkShape, build_model, parse_options
from medpipe.models.pyramid import (
    AffineStage,
    affine_displacement,
    after_affine,
    local_correlation,
    solve_small_spd,
)
from medpipe.registration.loss import RegistrationLoss, inverse_consistency, symmetric_batch
from medpipe.spatial import compose, warp
from medpipe.training.engine import EngineSettings, Trainer
from medpipe.training.optim import build_optimizer, build_scheduler
from medpipe.training.registration import RegistrationTask, train_registration
from medpipe.training_settings import OptimizerConfig

SMALL = {"encoder_channels": [4, 8, 8], "decoder_channels": [8, 8, 8]}


def test_local_correlation_is_the_scaled_dot_product_with_each_shifted_neighbour():
    torch.manual_seed(0)
    fixed, moving = torch.randn(1, 5, 6, 7, 8), torch.randn(1, 5, 6, 7, 8)
    correlation = local_correlation(fixed, moving, radius=1)
    assert correlation.shape == (1, 27, 6, 7, 8)
    offsets = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
    for channel, (i, j, k) in enumerate(offsets):
        x, y, z = 3, 4, 5
        expected = (fixed[0, :, x, y, z] * moving[0, :, x + i, y + j, z + k]).sum() / 5**0.5
        assert correlation[0, channel, x, y, z] == pytest.approx(float(expected), abs=1e-5)
    assert correlation[0, 0, 0, 0, 0] == 0  # the neighbour beyond the grid is zero


def test_a_new_network_is_the_identity_and_keeps_the_grid():
    torch.manual_seed(0)
    net = build_model("pyramid", NetworkShape(1, 3)).eval()
    moving, fixed = torch.rand(1, 1, 32, 24, 16), torch.rand(1, 1, 32, 24, 16)
    with torch.no_grad():
        warped, ddf = net(moving, fixed)
    assert ddf.shape == (1, 3, 32, 24, 16) and warped.shape == moving.shape
    assert ddf.abs().max() < 1e-2  # the last convolutions start at N(0, 1e-5)


def test_a_pyramid_needs_three_levels_and_matching_widths():
    with pytest.raises(MedpipeError, match="three levels"):
        parse_options("pyramid", {"encoder_channels": [4, 8], "decoder_channels": [4, 8]})
    with pytest.raises(MedpipeError, match="one entry per level"):
        parse_options("pyramid", {"encoder_channels": [4, 8, 8], "decoder_channels": [4]})


@pytest.mark.parametrize("steps", [0, 7])
def test_under_bf16_the_field_is_float32_and_warps_as_the_fp32_transform(steps):
    """The network's convolutions run in bf16; its field comes out float32 and the warped
    image is that field's float32 warp (within 1e-4)."""
    torch.manual_seed(0)
    net = build_model("pyramid", NetworkShape(1, 3), {**SMALL, "integration_steps": steps,
                                                        "global_stage": "affine"})
    with torch.no_grad():
        for decoder in (*net.decoders, net.affine.decoder):  # a few voxels, not the identity
            decoder.field.weight.normal_(0, 0.05)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        warped, ddf = net(moving, fixed)
    assert ddf.dtype == torch.float32 and ddf.abs().max() > 0.5
    torch.testing.assert_close(warped, warp(moving, ddf), atol=1e-4, rtol=0)


def test_inverse_consistency_is_zero_for_opposite_shifts_and_twice_a_repeated_one():
    shift = torch.zeros(1, 3, 12, 12, 12)
    shift[:, 0] = 1.0
    assert inverse_consistency(torch.cat([shift, -shift])) == pytest.approx(0.0, abs=1e-10)
    # x -> x + 2 e0 both ways: |2|^2 in one of three channels
    assert inverse_consistency(torch.cat([shift, shift])) == pytest.approx(4 / 3)


def test_a_symmetric_batch_holds_every_pair_both_ways():
    a, b, la, lb = (torch.full((1, 1, 2, 2, 2), float(v)) for v in range(4))
    moving, fixed, moving_labels, fixed_labels = symmetric_batch(a, b, la, lb)
    assert moving[:, 0, 0, 0, 0].tolist() == [0, 1] and fixed[:, 0, 0, 0, 0].tolist() == [1, 0]
    assert moving_labels[:, 0, 0, 0, 0].tolist() == [2, 3]
    assert fixed_labels[:, 0, 0, 0, 0].tolist() == [3, 2]


def test_the_pyramid_recovers_a_known_warp(tmp_path):
    """fixed(x) = moving(x + u(x)) for a known smooth u, trained with inverse consistency
    (the pair both ways) on that one pair: the predicted field comes close to u."""
    truth, dataset, pair = known_warp(iterations=30)
    settings = RegistrationConfig(similarity="mse", regularisation=0.05)
    loss = RegistrationLoss(settings, n_classes=2, inverse_consistency=0.1)
    task = RegistrationTask(dataset, [pair], loss)
    torch.manual_seed(0)
    net = build_model("pyramid", NetworkShape(1, 3), {})
    optimizer_settings = OptimizerConfig(name="adamw", lr=3e-3, schedule="constant")
    optimizer = build_optimizer(net, optimizer_settings)
    Trainer(net, task, optimizer, build_scheduler(optimizer, optimizer_settings, 60),
            EngineSettings(epochs=2, iterations_per_epoch=30, val_every=2),
            tmp_path / "checkpoints").fit()
    _, error, magnitude = end_point_error(net, pair, truth)
    assert error < 0.4 * magnitude, f"end-point error {error:.3f} vs |u| {magnitude:.3f} voxels"


def test_pyramid_trains_and_is_scored_through_the_workflow_commands(tiny_pipeline, tmp_path):
    config = load_config(tiny_pipeline / "config.yaml", [
        "models.pyramid.options.encoder_channels=[4,8,8]",
        "models.pyramid.options.decoder_channels=[8,8,8]",
        "registration.atlas=brain_001", "training.batch_size=1", "training.epochs=1",
        "training.iterations_per_epoch=2", "registration.eval_pairs=2"])
    run_dir = tmp_path / "pyramid"
    train_registration(config, "pyramid", 0, run_dir, progress=False)
    summary = evaluate_registration(config, "pyramid", 0, run_dir, device="cpu")
    assert summary["pairs"] >= 1 and 0 <= summary["mean_dice"]["mean"] <= 1
    assert summary["folding_percent"]["mean"] == pytest.approx(0.0, abs=0.1)


def voxel_matrix(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The 4x4 voxel-index map (column vectors) of an `AffineStage` matrix M (row vectors in
    the levels' shared coordinates p = (2 i + 1) / n - 1), composed from its parts."""
    n = np.asarray(shape, dtype=np.float64)
    to_points = np.diag([*(2 / n), 1.0])
    to_points[:3, 3] = 1 / n - 1
    return np.linalg.inv(to_points) @ np.vstack([matrix.T, [0, 0, 0, 1]]) @ to_points


def test_the_affine_stage_fits_a_known_affine_whatever_the_confidences():
    """Displacements of a known affine with uneven confidences: the fit is the affine (within
    the ridge's pull), and its field in voxels is the voxel map of the matrix composed
    independently."""
    torch.manual_seed(0)
    shape = (6, 7, 5)
    matrix = torch.eye(4, 3)[None] + torch.cat([0.06 * torch.randn(1, 3, 3),
                                                0.1 * torch.randn(1, 1, 3)], dim=1)
    truth = affine_displacement(matrix, shape)
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij")).reshape(3, -1)
    mapped = voxel_matrix(matrix[0].double().numpy(), shape) @ np.vstack(
        [index, np.ones(index.shape[1])])
    np.testing.assert_allclose(truth[0].reshape(3, -1).numpy(), mapped[:3] - index, atol=1e-5)
    confidence = 3 * torch.randn(1, 1, *shape)
    stage = AffineStage(27, 8)
    stage.decoder.forward = lambda _: torch.cat([truth / stage.STEP, confidence], dim=1)
    torch.testing.assert_close(stage(torch.zeros(1, 27, *shape)), matrix, atol=2e-3, rtol=0)


def test_a_field_after_the_affine_is_their_composition_and_only_its_rest_is_penalised():
    torch.manual_seed(0)
    shape = (12, 14, 10)
    matrix = torch.eye(4, 3)[None] + torch.cat([0.05 * torch.randn(1, 3, 3),
                                                0.05 * torch.randn(1, 1, 3)], dim=1)
    affine = affine_displacement(matrix, shape)
    local = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *shape), 3, 1, 1)
    inner = (slice(None), slice(None), *(slice(3, -3),) * 3)  # away from border clamping
    torch.testing.assert_close(after_affine(local, matrix)[inner],
                               compose(local, affine)[inner], atol=1e-5, rtol=0)
    loss = RegistrationLoss(RegistrationConfig(), n_classes=2)
    image = torch.rand(1, 1, *shape)
    similarity = loss.image_terms(image, image, torch.zeros_like(affine))
    assert float(loss.image_terms(image, image, affine, global_ddf=affine)) == pytest.approx(
        float(similarity), abs=1e-6)  # an affine alone costs nothing
    assert float(loss.image_terms(image, image, affine)) > float(similarity) + 1e-3


def test_the_small_solver_matches_torch_and_the_pyramid_exports_to_onnx(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    a = torch.randn(3, 4, 6)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(4)
    b = torch.randn(3, 4, 3)
    torch.testing.assert_close(solve_small_spd(a, b), torch.linalg.solve(a, b),
                               atol=1e-4, rtol=1e-4)
    net = build_model("pyramid", NetworkShape(1, 3), {**SMALL, "global_stage": "affine"}).eval()
    with torch.no_grad():
        net.affine.decoder.field.weight.normal_(0, 0.5)  # a global stage that moves
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    torch.onnx.export(net, (moving, fixed), str(tmp_path / "p.onnx"), dynamo=True,
                      opset_version=20, verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "p.onnx"))
    _, ddf = session.run(None, {"moving": moving.numpy(), "fixed": fixed.numpy()})
    with torch.no_grad():
        _, expected = net(moving, fixed)
    assert expected.abs().max() > 0.1
    np.testing.assert_allclose(ddf, expected.numpy(), atol=1e-4)

