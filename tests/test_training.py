"""Real training steps of all three baselines on a tiny real dataset: learning, exact
resume after a hard kill, checkpoints that load with weights_only, clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medpipe.config import load_config
from medpipe.errors import MedpipeError
from medpipe.models import NetworkShape, build_model
from medpipe.preprocessing import load_labelled_cases
from medpipe.runs.folder import RunFolder
from medpipe.runs.loading import load_trained
from medpipe.runs.spec import read_run_spec
from medpipe.training.patches import PatchDataset
from medpipe.training.segmentation import SegmentationTask, train_segmentation

NO_TRACKING = ["tracking.enabled=false"]


def fixed_batch_loss(root, run_dir, weights: str | None) -> float:
    """Loss of one fixed, un-augmented batch under the initial (None) or trained weights."""
    spec = read_run_spec(RunFolder(run_dir))
    config = load_config(root / "config.yaml")
    cases = load_labelled_cases(config.preprocessed_dir, spec.train_cases)
    dataset = PatchDataset(cases, spec.patch_size, 2, 1, seed=99)
    task = SegmentationTask(dataset, [], spec.label_scheme)
    if weights is None:
        torch.manual_seed(spec.training.seed)  # as training initialises
        shape = NetworkShape(spec.in_channels, spec.out_channels, spec.architecture)
        net = build_model(spec.model, shape, spec.options)
    else:
        net, _ = load_trained(RunFolder(run_dir), weights)
    batch = next(iter(task.batches(0)))
    net.train()  # the training-time output (deep supervision included)
    with torch.no_grad():
        return task.loss(net, batch, torch.device("cpu"))[0].item()


# Swin-UNETR at batch 1 and 2 steps an epoch ended 0.87-0.94 of its first loss here (seeds
# 0-2, bf16 and fp32) and 0.905 on CI's CPU; at batch 2 and 3 steps 0.84-0.86
@pytest.mark.parametrize(("model", "steps", "batch"),
                         [("unet", 4, 2), ("nnunet", 4, 2), ("swin_unetr", 3, 2)])
def test_each_baseline_learns(tiny_pipeline, model, steps, batch):
    config = load_config(
        tiny_pipeline / "config.yaml",
        [*NO_TRACKING, "training.epochs=3", f"training.iterations_per_epoch={steps}",
         "training.augment=false", "training.val_every=3",
         f"models.{model}.training.batch_size={batch}"],
    )
    run_dir = train_segmentation(config, model, 0, tiny_pipeline / "runs" / model,
                                 restart=True, progress=False)
    before = fixed_batch_loss(tiny_pipeline, run_dir, None)
    after = fixed_batch_loss(tiny_pipeline, run_dir, "latest")
    assert after < 0.9 * before, (before, after)
    meta = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert meta["epoch"] == 3 and len(meta["history"]) == 3
    assert "val_score" in meta["history"][-1]  # the last epoch always validates
    # checkpoints hold only tensors and numbers: they load with weights_only=True
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng_cpu"} <= set(state)


def test_nnunet_resenc_learns_from_residual_encoder_plans(tiny_pipeline, tmp_path):
    # the tiny dataset planned again by nnU-Net's ResEnc M preset (its 3d_fullres shares the
    # default plans' preprocessed data, as in nnU-Net), features shrunk as for `nnunet`
    import shutil

    import yaml
    from conftest import TINY_FEATURES

    from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans

    root = tmp_path / "resenc"
    shutil.copytree(tiny_pipeline / "results", root / "results")
    config = yaml.safe_load((tiny_pipeline / "config.yaml").read_text())
    config["results"] = str(root / "results")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    config = load_config(root / "config.yaml", [
        *NO_TRACKING, "training.epochs=3", "training.iterations_per_epoch=4",
        "training.augment=false", "training.val_every=3"])
    # beside the default plans.json, as the workflow plans them (plans_ResEncM.json)
    assert config.plans_file_for("nnunet_resenc") != config.plans_file
    plans = plan_experiment(fingerprint_dataset(tiny_pipeline / "raw"), planner="ResEncM")
    stages = plans.configuration("3d_fullres").architecture.arch_kwargs.n_stages
    resenc = config.plans_file_for("nnunet_resenc")
    write_plans(plans.with_features("3d_fullres", tuple(TINY_FEATURES[:stages])), resenc)
    # plans whose configuration is preprocessed otherwise than plans.json's are refused
    written = resenc.read_text()
    resenc.write_text(written.replace("medpipePlans_3d_fullres", "otherPlans_3d_fullres"))
    with pytest.raises(MedpipeError, match="preprocess 3d_fullres differently"):
        train_segmentation(config, "nnunet_resenc", 0, root / "refused", progress=False)
    assert not (root / "refused").exists()
    resenc.write_text(written)
    run_dir = train_segmentation(config, "nnunet_resenc", 0, root / "runs" / "nnunet_resenc",
                                 progress=False)
    before = fixed_batch_loss(root, run_dir, None)
    after = fixed_batch_loss(root, run_dir, "latest")
    assert after < 0.9 * before, (before, after)
    spec = read_run_spec(RunFolder(run_dir))
    assert spec.architecture.n_blocks_per_stage == (1, 3, 4, 6)[:stages]


def test_killed_training_resumes_to_bit_identical_weights(tiny_pipeline, tmp_path):
    settings = [*NO_TRACKING, "training.epochs=4", "training.iterations_per_epoch=6"]
    config = load_config(tiny_pipeline / "config.yaml", settings)
    reference = train_segmentation(config, "unet", 0, tmp_path / "straight", progress=False)

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "medpipe.cli", "train-seg", "--config",
               str(tiny_pipeline / "config.yaml"), "--model", "unet", "--fold", "0",
               "--run-dir", str(interrupted)] + [f"--set={s}" for s in settings]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    latest = interrupted / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not latest.is_file():
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # no clean-up, like a node that dies
    process.wait()
    killed_at = json.loads(latest.read_text())["epoch"]
    assert 1 <= killed_at < 4, "the kill should land mid-training"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {killed_at}" in resumed.stderr
    a = torch.load(reference / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "latest.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    history_a = json.loads((reference / "checkpoints" / "latest.json").read_text())["history"]
    history_b = json.loads(latest.read_text())["history"]
    assert [h["train_loss"] for h in history_a] == [h["train_loss"] for h in history_b]


def test_changed_settings_do_not_silently_resume(tiny_pipeline, tmp_path):
    config = load_config(tiny_pipeline / "config.yaml",
                         [*NO_TRACKING, "training.epochs=1", "training.iterations_per_epoch=1"])
    train_segmentation(config, "unet", 0, tmp_path / "run", progress=False)
    changed = load_config(tiny_pipeline / "config.yaml",
                          [*NO_TRACKING, "training.epochs=1", "training.iterations_per_epoch=1",
                           "models.unet.training.optimizer.lr=0.1"])
    with pytest.raises(MedpipeError, match="--restart"):
        train_segmentation(changed, "unet", 0, tmp_path / "run", progress=False)
    train_segmentation(changed, "unet", 0, tmp_path / "run", restart=True, progress=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_errors_name_the_problem(tiny_pipeline, tmp_path):
    config = str(tiny_pipeline / "config.yaml")
    result = run_cli("train-seg", "--config", config, "--model", "vnet")
    assert result.returncode == 2
    assert "unknown model 'vnet'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train-seg", "--config", config, "--model", "unet",
                     "--set", f"results={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "plans.json" in result.stderr and "medpipe plan" in result.stderr
    result = run_cli("train-seg", "--config", config, "--model", "unet",
                     "--set", "training.epochs=zero")
    assert result.returncode == 2 and "epochs" in result.stderr
    result = run_cli("train-seg", "--config", config, "--model", "unet", "--fold", "7")
    assert result.returncode == 2 and "fold 7" in result.stderr


class _LossWithNaNs:
    """A task whose loss is NaN at the iterations in NAN_AT (a NaN voxel in a case, say)."""

    unit = "patches"

    def __init__(self, nan_at, iterations=3):
        self.nan_at, self.iterations = set(nan_at), iterations

    def batches(self, epoch, processes):
        return [(i, torch.ones(1, 1, 4, 4, 4)) for i in range(self.iterations)]

    def loss(self, model, batch, device):
        index, image = batch
        loss = (model(image) - 2.0).pow(2).mean()
        return (loss * torch.tensor(float("nan")) if index in self.nan_at else loss), 1

    def validate(self, model, device):
        return {"score": 0.0}


def _nan_trainer(task, folder, epochs=1, fused=False, sync_every=None):
    """FUSED: the optimizer skips a bad step on the device (found_inf) and the engine reads
    the device every SYNC_EVERY steps; otherwise it reads it every step."""
    from medpipe.training.engine import EngineSettings, Trainer

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, fused=fused)
    return Trainer(net, task, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer),
                   EngineSettings(epochs=epochs, iterations_per_epoch=task.iterations,
                                  val_every=1, sync_every=sync_every), folder)


@pytest.mark.parametrize("fused, sync_every", [(False, None), (True, 4)])
def test_a_diverging_loss_stops_training_before_the_step(tmp_path, fused, sync_every):
    """Three non-finite losses in a row are an error naming where it happened, and the
    weights are not updated with any of them (read late, when the device is read every 4
    steps, but named exactly)."""
    from medpipe.errors import MedpipeError

    trainer = _nan_trainer(_LossWithNaNs(nan_at={0, 1, 2}, iterations=6),
                           tmp_path / "checkpoints", fused=fused, sync_every=sync_every)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(MedpipeError, match="training diverged: the loss is nan at epoch 1, "
                                           "iteration 3, 3 non-finite steps in a row"):
        trainer.fit()
    if not fused:  # read at once: no step after the third
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("fused, sync_every", [(False, None), (True, 3)])
def test_a_single_non_finite_step_is_skipped_counted_and_training_goes_on(tmp_path, fused,
                                                                          sync_every):
    """A lone NaN loss skips its step, as GradScaler skips an fp16 overflow: the run ends
    with the weights of a run that never drew that batch, and the skip is recorded."""
    skipping = _nan_trainer(_LossWithNaNs(nan_at={1}, iterations=4), tmp_path / "a",
                            fused=fused, sync_every=sync_every)
    history = skipping.fit()
    assert history[0]["skipped_steps"] == 1 and skipping.summary()["skipped_steps"] == 1
    assert history[0]["epoch_samples"] == 4  # the budget was drawn, one step not taken
    # the same updates as a run of the 3 finite steps only (SGD without momentum)
    clean = _nan_trainer(_LossWithNaNs(nan_at=set(), iterations=3), tmp_path / "b",
                         fused=fused)
    clean.fit()
    for key, value in skipping.model.state_dict().items():
        assert torch.allclose(value, clean.model.state_dict()[key])
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["grad_norm"])


def test_a_fused_optimizer_steps_without_reading_the_device(tmp_path, monkeypatch):
    """Between reads (every `sync_every` steps) nothing asks the device for a value: the
    number of host reads of an epoch does not grow with its steps."""
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = []
    for iterations in (4, 12):
        trainer = _nan_trainer(_LossWithNaNs(nan_at=set(), iterations=iterations),
                               tmp_path / str(iterations), fused=True, sync_every=100)
        reads.clear()
        trainer.train_epoch()
        counts.append(len(reads))
    assert counts[0] == counts[1] and counts[0] < 20


def _mixed_precision_trainer(folder, epochs, amp_dtype):
    from medpipe.training.engine import EngineSettings, Trainer

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    return Trainer(net, _LossWithNaNs(nan_at=set()), optimizer,
                   torch.optim.lr_scheduler.ConstantLR(optimizer),
                   EngineSettings(epochs=epochs, iterations_per_epoch=3, val_every=1,
                                  amp_dtype=amp_dtype), folder)


def test_fp16_with_loss_scaling_trains_on_the_cpu_and_resumes_across_precisions(tmp_path):
    """The GPU's fp16 + GradScaler path, run on the CPU (torch has both there); a run resumes
    from a checkpoint of another precision: bf16 ignores fp16's scaler state, and fp16 starts
    its scaler afresh from a bf16 checkpoint (whose scaler state is empty)."""
    folder = tmp_path / "checkpoints"
    fp16 = _mixed_precision_trainer(folder, 1, "fp16")
    assert fp16.dtype is torch.float16 and fp16.scaler.is_enabled()
    before = fp16.model.weight.detach().clone()
    history = fp16.fit()
    assert not torch.equal(before, fp16.model.weight)  # the scaled steps were taken
    # each overflow halves the scale from its initial 2^16 and is counted as a skipped step
    # (not a divergence: the gradient norm stays finite in the history)
    saved = torch.load(folder / "latest.pt", weights_only=True)["scaler"]
    overflows = round(math.log2(65536.0 / saved["scale"]))
    assert 0 < overflows < 3 and history[0]["skipped_steps"] == overflows
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["grad_norm"])

    bf16 = _mixed_precision_trainer(folder, 2, "bf16")
    assert bf16.dtype is torch.bfloat16 and not bf16.scaler.is_enabled()
    assert bf16.resume() and bf16.epoch == 1
    bf16.fit()
    assert torch.load(folder / "latest.pt", weights_only=True)["scaler"] == {}
    again = _mixed_precision_trainer(folder, 3, "fp16")
    assert again.resume() and again.epoch == 2  # raised before: an empty scaler state
    assert again.fit()[-1]["epoch"] == 3


def test_deep_supervision_scores_each_output_against_labels_at_its_size():
    # an independent computation: nnU-Net's weights 1, 1/2 normalised, the lower output scored
    # against the labels downsampled by nearest-exact (voxel 2i+1 of each halved axis)
    from monai.losses import DiceCELoss

    from medpipe.data.labels import LabelScheme

    labels = LabelScheme.from_labels({"background": 0, "a": 1, "b": 2})
    task = SegmentationTask(None, [], labels)
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 8, 8, 4, generator=generator)
    half = torch.randn(2, 3, 4, 4, 4, generator=generator)
    label = torch.randint(0, 3, (2, 1, 8, 8, 4), generator=generator)

    class Fixed(torch.nn.Module):
        def forward(self, image):
            return [full, half]

    loss, n = task.loss(Fixed(), {"image": torch.zeros(2, 1, 8, 8, 4), "label": label},
                        torch.device("cpu"))
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    expected = (2 / 3 * dice_ce(full, label) + 1 / 3 * dice_ce(half, label[:, :, 1::2, 1::2]))
    assert n == 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_one_budget_in_samples_gives_every_model_as_many_samples(tiny_pipeline, tmp_path):
    """`training.budget_samples` sets the steps per epoch from each model's batch size: a
    segmentation model at batch 2, one at batch 1 and a registration network (2 pairs per
    step, the shared setting) all see the budget, validate as often, and record it."""
    from medpipe.training.registration import train_registration

    config = load_config(tiny_pipeline / "config.yaml", [
        "tracking.enabled=false", "training.augment=false", "training.epochs=2",
        "training.iterations_per_epoch=50", "training.budget_samples=8",
        "models.nnunet.training.batch_size=1", "registration.atlas=brain_001"])
    seen = {}
    for model, train in (("unet", train_segmentation), ("nnunet", train_segmentation),
                         ("voxelmorph", train_registration)):
        folder = train(config, model, 0, tmp_path / model, progress=False)
        summary = json.loads((folder / "training.json").read_text())
        spec = read_run_spec(RunFolder(folder))
        seen[model] = (summary["epochs"], spec.training.iterations_per_epoch, spec.batch_size,
                       summary["samples_seen"])
    assert seen == {"unet": (2, 2, 2, 8), "nnunet": (2, 4, 1, 8), "voxelmorph": (2, 2, 2, 8)}
