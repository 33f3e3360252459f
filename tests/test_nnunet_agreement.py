"""Our planner against nnU-Net v2's own, on the demo data and an anisotropic variant.

nnU-Net runs as its users run it (`nnUNetv2_extract_fingerprint`, `nnUNetv2_plan_experiment`)
on a copy of the dataset. Its plans list axes reversed (SimpleITK's z, y, x) and transposed
by `transpose_forward`; we undo that before comparing. Tolerance: target spacing to 1e-6 mm;
normalisation, patch size, batch size, strides and kernel sizes exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medpipe.data.demo import DemoSettings, build_demo_dataset
from medpipe.planning import fingerprint_dataset, plan_experiment

# nnU-Net lives in its own environment (`make test` builds .venv-nnunet); default: ours
NNUNET_BIN = Path(os.environ.get("MEDPIPE_NNUNET_BIN", Path(sys.executable).parent))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (NNUNET_BIN / "nnUNetv2_plan_experiment").exists(),
        reason=f"nnU-Net v2 is not installed in {NNUNET_BIN}",
    ),
]


def nnunet_plans(dataset: Path, work: Path, dataset_id: int,
                 planners: dict[str, str] | None = None) -> dict:
    """nnU-Net's plans.json for DATASET; with PLANNERS ({nnU-Net planner class: its plans
    file name}), {plans name: plans} for each of them, from one fingerprint."""
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"),
        "PYTHONIOENCODING": "utf-8",
    }
    name = f"Dataset{dataset_id:03d}_Medpipe"
    shutil.copytree(dataset, work / "raw" / name)
    wanted = planners or {"ExperimentPlanner": "nnUNetPlans"}
    commands = [[NNUNET_BIN / "nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "2"]]
    commands += [[NNUNET_BIN / "nnUNetv2_plan_experiment", "-d", str(dataset_id), "-pl", planner]
                 for planner in wanted]
    for command in commands:
        result = subprocess.run(
            command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    plans = {plans_name: json.loads((work / "preprocessed" / name / f"{plans_name}.json")
                                    .read_text()) for plans_name in wanted.values()}
    return plans if planners else plans["nnUNetPlans"]


def in_array_order(values, transpose_backward):
    """nnU-Net's (transposed, z-y-x) list -> medpipe's (i, j, k)."""
    zyx = [values[a] for a in transpose_backward]
    return list(reversed(zyx))


@pytest.mark.parametrize(
    ("spacing", "dataset_id"), [(3.0, 11), ((1.5, 1.5, 6.0), 12)], ids=["demo_3mm", "aniso"]
)
def test_plans_agree_with_nnunet(tmp_path, spacing, dataset_id):
    dataset = build_demo_dataset(
        tmp_path / "raw", DemoSettings(cases=4, test_cases=0, spacing=spacing, seed=5)
    )
    ours = plan_experiment(fingerprint_dataset(dataset, workers=2)).configurations
    theirs_plans = nnunet_plans(dataset, tmp_path / "nnunet", dataset_id)
    back = theirs_plans["transpose_backward"]
    theirs = theirs_plans["configurations"]  # nnU-Net's own plans.json, read as it wrote it

    assert set(ours) == set(theirs) - {"2d", "3d_cascade_fullres"}
    mine, reference = ours["3d_fullres"], theirs["3d_fullres"]
    np.testing.assert_allclose(
        mine.spacing, in_array_order(reference["spacing"], back), atol=1e-6
    )
    assert list(mine.patch_size) == in_array_order(reference["patch_size"], back)
    assert mine.batch_size == reference["batch_size"]
    assert list(mine.normalization_schemes) == reference["normalization_schemes"]
    assert list(mine.use_mask_for_norm) == reference["use_mask_for_norm"]
    assert mine.architecture.network_class_name == \
        reference["architecture"]["network_class_name"]
    arch, ref_arch = mine.architecture.arch_kwargs, reference["architecture"]["arch_kwargs"]
    assert arch.n_stages == ref_arch["n_stages"]
    assert list(arch.features_per_stage) == list(ref_arch["features_per_stage"])
    for key in ("strides", "kernel_sizes"):
        assert [list(entry) for entry in getattr(arch, key)] == [
            in_array_order(entry, back) for entry in ref_arch[key]]


RESENC = {"nnUNetPlannerResEncM": ("ResEncM", "nnUNetResEncUNetMPlans"),
          "nnUNetPlannerResEncL": ("ResEncL", "nnUNetResEncUNetLPlans"),
          "nnUNetPlannerResEncXL": ("ResEncXL", "nnUNetResEncUNetXLPlans")}


def test_residual_encoder_presets_agree_with_nnunet(tmp_path):
    # 1.5 mm brains (median 131 x 155 x 126): M shrinks its patch to fit 8 GB, L and XL keep
    # 160 x 160 x 128 with a batch capped by the dataset's size, so every rule is exercised
    dataset = build_demo_dataset(
        tmp_path / "raw", DemoSettings(cases=4, test_cases=0, spacing=1.5, seed=5))
    fingerprint = fingerprint_dataset(dataset, workers=2)
    theirs_by_name = nnunet_plans(dataset, tmp_path / "nnunet", 13,
                                  {planner: name for planner, (_, name) in RESENC.items()})
    patches = set()
    for ours_name, plans_name in RESENC.values():
        theirs_plans = theirs_by_name[plans_name]
        back = theirs_plans["transpose_backward"]
        mine = plan_experiment(fingerprint, planner=ours_name).configuration("3d_fullres")
        reference = theirs_plans["configurations"]["3d_fullres"]
        where = f"{ours_name}: "
        assert list(mine.patch_size) == in_array_order(reference["patch_size"], back), where
        assert mine.batch_size == reference["batch_size"], where
        arch, ref_arch = mine.architecture, reference["architecture"]
        assert arch.network_class_name == ref_arch["network_class_name"], where
        kwargs, ref_kwargs = arch.arch_kwargs, ref_arch["arch_kwargs"]
        assert list(kwargs.n_blocks_per_stage) == list(ref_kwargs["n_blocks_per_stage"]), where
        assert list(kwargs.n_conv_per_stage_decoder) == list(
            ref_kwargs["n_conv_per_stage_decoder"]), where
        assert list(kwargs.features_per_stage) == list(ref_kwargs["features_per_stage"]), where
        for key in ("strides", "kernel_sizes"):
            assert [list(entry) for entry in getattr(kwargs, key)] == [
                in_array_order(entry, back) for entry in ref_kwargs[key]], where
        patches.add(tuple(mine.patch_size))
    assert len(patches) == 2  # M's patch was shrunk, L's and XL's not


def test_augmentation_cuts_the_larger_patch_nnunet_cuts():
    # nnU-Net's trainer sizes the patch its sampler cuts before rotating and scaling with
    # `get_patch_size` (+-30 deg, or +-180 in-plane for anisotropic "dummy 2D" patches)
    from medpipe.training.augment import input_size, is_dummy_2d

    patches = [(80, 96, 64), (128, 128, 128), (20, 192, 160), (48, 224, 192), (40, 40, 40)]
    script = (
        "import json, sys, numpy as np\n"
        "from nnunetv2.training.data_augmentation.compute_initial_patch_size import "
        "get_patch_size\n"
        "out = []\n"
        "for p in json.loads(sys.argv[1]):\n"
        "    dummy = max(p) / p[0] > 3\n"
        "    r = np.pi if dummy else np.pi / 6\n"
        "    s = get_patch_size(p, (-r, r), (-r, r), (-r, r), (0.85, 1.25))\n"
        "    if dummy: s[0] = p[0]\n"
        "    out.append([int(v) for v in s])\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([NNUNET_BIN / "python", "-c", script, json.dumps(patches)],
                            capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = [tuple(s) for s in json.loads(result.stdout)]
    assert [input_size(p) for p in patches] == theirs
    assert [is_dummy_2d(p) for p in patches] == [False, False, True, True, False]
