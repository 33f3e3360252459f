"""A dataset that is not the demo's, through the workflow as a stranger would run it:
abdominal CT phantoms (`phantoms.py`: HU, `.mha`, 1.5 x 1.5 x 5 mm voxels in a tilted,
flipped frame, every case its own shape and origin, a class some cases lack)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from helpers import BIN, as_user, assert_no_traceback_in_logs, run_workflow
from phantoms import write_ct_dataset


@pytest.mark.slow
def test_ct_phantoms_go_from_init_to_a_report(tmp_path):
    write_ct_dataset(tmp_path / "raw", cases=6, test_cases=3, seed=1)
    run = as_user(tmp_path)
    run(str(BIN / "medpipe"), "verify", "raw")
    run(str(BIN / "medpipe"), "init", "raw", "-o", "config.yaml")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    # what a user with 2 cores and ten minutes changes: fewer folds and models, a tiny budget
    config.update(segmentation_models=["unet", "nnunet"], train_folds=[0], folds=3)
    config["training"].update(epochs=2, budget_samples=8, val_every=1, num_workers=0)
    config["models"]["unet"]["options"].update(channels=[8, 16, 32], strides=[2, 2],
                                               num_res_units=1)
    config["models"]["nnunet"]["options"]["features_per_stage"] = [4, 8, 16, 32, 64]
    config["registration"].update(models=["voxelmorph"], baselines=["identity", "classical"],
                                  eval_cases="test", eval_pairs=3, val_pairs=1)
    config["registration"]["instance_optimisation"]["steps"] = 0
    config["registration"]["classical"]["demons_iterations"] = 10
    config["models"]["voxelmorph"]["options"]["channels"] = [8, 8, 8, 8, 8, 8]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_workflow(run)

    results = tmp_path / "results"
    plans = json.loads((results / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert plans["normalization_schemes"] == ["CTNormalization"]
    assert plans["spacing"] == [1.5, 1.5, 5.0]  # anisotropic: the coarse axis kept
    summary = json.loads((results / "compare" / "summary.json").read_text())
    assert summary["segmentation_scope"] == "test set, n = 3 cases"
    assert summary["registration_scope"] == "test pairs, n = 3"
    assert {"dice_liver", "dice_kidney", "dice_lesion"} <= set(summary["segmentation"][0])
    # no registration is the floor, not zero: the scans' origins lie up to 400 mm apart
    # and the centres of mass are matched (a zero field scored 0.000 here)
    rows = {row["model"]: row for row in summary["registration"]}
    assert rows["identity"]["mean_dice"][0] > 0.3
    assert rows["classical"]["mean_dice"][0] > rows["identity"]["mean_dice"][0]
    # the test predictions lie on each input's grid, tilt and flip included
    for prediction in sorted((results / "test" / "unet" / "predictions").glob("*.mha")):
        image = sitk.ReadImage(str(tmp_path / "raw" / "imagesTs"
                                   / prediction.name.replace(".mha", "_0000.mha")))
        predicted = sitk.ReadImage(str(prediction))
        assert predicted.GetSize() == image.GetSize()
        for read in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(predicted, read)(), getattr(image, read)(),
                                       atol=1e-6)
    assert len(list((results / "test" / "unet" / "predictions").glob("*.mha"))) == 3
    report = (results / "compare" / "report.md").read_text(encoding="utf-8")
    assert "Dice liver" in report and "## Registration (test pairs, n = 3)" in report
    assert_no_traceback_in_logs(results)
