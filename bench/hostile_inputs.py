"""The careless-user / hostile-input campaign, rerun against a checkout: every case must end in
a non-zero exit with one line naming the file (or the option), no traceback, no input changed,
nothing written outside the case's own output folder, and no command run from a path.

    python bench/hostile_inputs.py --model demo/results/runs/unet/fold_0 \
        --reg-model demo/results/runs/voxelmorph/fold_0 \
        --out bench/results/hostile_inputs.json [--repo PATH_OF_A_FRESH_CLONE]

`--model` / `--reg-model` are any trained segmentation and registration folds (the first is
copied into a sandbox and damaged there; neither is touched).
Cases are built in a sandbox under a temporary folder; each runs `python -m medpipe.cli` from
`--repo` (default: this checkout), so a fresh clone is checked, not the installed copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class Case:
    name: str
    args: list[str]
    must_name: str  # a fragment the one-line error has to contain (a file or an option)
    exit_code: int | None = None  # None: any non-zero
    warning: bool = False  # a success with one `warning:` line is the expected answer
    skip: bool = False  # cannot be shown on this machine (said in the results)
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    stderr: str = ""


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def nifti(path: Path, array: np.ndarray, spacing=(3.0, 3.0, 3.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def dataset(root: Path, n: int = 3, shape=(24, 24, 20)) -> Path:
    """A valid three-class dataset; the cases below each break one copy of it."""
    rng = np.random.default_rng(0)
    for index in range(n):
        label = np.zeros(shape, np.uint8)
        label[6:16, 6:16, 5:14] = 1
        label[9:13, 9:13, 8:11] = 2
        image = (rng.normal(0, 1, shape) + 3 * label).astype(np.float32)
        nifti(root / "imagesTr" / f"case_{index:03d}_0000.nii.gz", image)
        nifti(root / "labelsTr" / f"case_{index:03d}.nii.gz", label)
    spec = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def broken(sandbox: Path, name: str, damage) -> Path:
    root = dataset(sandbox / "inputs" / name)
    damage(root)
    return root


def build_cases(sandbox: Path, model: Path, reg_model: Path) -> list[Case]:
    inputs = sandbox / "inputs"
    out = sandbox / "outputs"
    scans = inputs / "scans"
    shape = (60, 70, 60)
    rng = np.random.default_rng(1)
    good = nifti(scans / "good_0000.nii.gz", rng.normal(100, 30, shape).astype(np.float32))
    nan = rng.normal(100, 30, shape).astype(np.float32)
    nan[5, 5, 5] = np.nan
    nifti(scans / "nan_0000.nii.gz", nan)
    inf = rng.normal(100, 30, shape).astype(np.float32)
    inf[1, 2, 3] = np.inf
    nifti(scans / "inf_0000.nii.gz", inf)
    nifti(scans / "zeros_0000.nii.gz", np.zeros(shape, np.float32))
    nifti(scans / "huge_0000.nii.gz", (rng.normal(1, 0.3, shape) * 1e30).astype(np.float32))
    nifti(scans / "big_spacing_0000.nii.gz", rng.normal(100, 30, (70, 70, 70)).astype(np.float32),
          spacing=(40.0, 40.0, 40.0))
    (scans / "empty_0000.nii.gz").write_bytes(b"")
    (scans / "text_0000.nii.gz").write_text("not an image")
    (scans / "notes.txt").write_text("a user's file that must survive")
    flat = np.array([[3.0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.normal(100, 30, shape).astype(np.float32), flat),
             str(scans / "singular_0000.nii.gz"))

    # models: the real one, copied; a zero-byte checkpoint; a hostile pickle; broken model.json
    models = inputs / "models"
    real = models / "real"
    shutil.copytree(model, real, ignore=shutil.ignore_patterns("test_predictions", "validation",
                                                              "figures", "evaluation",
                                                              "test_evaluation"))
    checkpoints = sorted((real / "checkpoints").glob("*.pt"))

    def model_copy(name, damage):
        target = models / name
        shutil.copytree(real, target)
        damage(target)
        return target

    def zero_checkpoint(target):
        for path in (target / "checkpoints").glob("*.pt"):
            path.write_bytes(b"")

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {sandbox}/INJECTED_PICKLE",))

    def pickle_checkpoint(target):
        for path in (target / "checkpoints").glob("*.pt"):
            path.write_bytes(pickle.dumps(Hostile()))

    def model_json_missing_keys(target):
        (target / "model.json").write_text(json.dumps({"name": "unet"}))

    def model_json_garbage(target):
        (target / "model.json").write_text("{ not json")

    def plans_zero_spacing(target):
        plans = json.loads((target / "plans.json").read_text())
        text = json.dumps(plans)
        for config in plans.get("configurations", {}).values():
            if "spacing" in config:
                config["spacing"] = [0, 0, 0]
        if json.dumps(plans) == text:
            plans["configurations"] = "broken"
        (target / "plans.json").write_text(json.dumps(plans))

    zero = model_copy("zero_checkpoint", zero_checkpoint)
    hostile = model_copy("pickle_checkpoint", pickle_checkpoint)
    missing = model_copy("model_json_missing", model_json_missing_keys)
    garbage = model_copy("model_json_garbage", model_json_garbage)
    zero_spacing = model_copy("plans_zero_spacing", plans_zero_spacing)
    del checkpoints

    # datasets, each with one fault
    def label_shape(root):
        nifti(root / "labelsTr" / "case_001.nii.gz", np.zeros((20, 24, 20), np.uint8))

    def nan_image(root):
        path = root / "imagesTr" / "case_002_0000.nii.gz"
        array = np.asarray(nib.load(str(path)).dataobj).copy()
        array[3, 3, 3] = np.nan
        nifti(path, array)

    def float_labels(root):
        nifti(root / "labelsTr" / "case_000.nii.gz",
              np.full((24, 24, 20), 0.5, np.float32))

    def undeclared_label(root):
        path = root / "labelsTr" / "case_001.nii.gz"
        array = np.asarray(nib.load(str(path)).dataobj).copy()
        array[0, 0, 0] = 7
        nifti(path, array)

    def negative_label(root):
        path = root / "labelsTr" / "case_001.nii.gz"
        array = np.asarray(nib.load(str(path)).dataobj).astype(np.int16)
        array[0, 0, 0] = -1
        nifti(path, array)

    def non_consecutive(root):
        spec = json.loads((root / "dataset.json").read_text())
        spec["labels"] = {"background": 0, "a": 1, "b": 5}
        (root / "dataset.json").write_text(json.dumps(spec))
        for path in (root / "labelsTr").glob("*.nii.gz"):
            array = np.asarray(nib.load(str(path)).dataobj).copy()
            array[array == 2] = 5
            nifti(path, array)

    def traversal_ending(root):
        spec = json.loads((root / "dataset.json").read_text())
        spec["file_ending"] = "/../../../../../../../../tmp/escaped.nii.gz"
        (root / "dataset.json").write_text(json.dumps(spec))

    def bad_json(root):
        (root / "dataset.json").write_text('{"labels": ')

    def geometry_mismatch(root):
        path = root / "labelsTr" / "case_000.nii.gz"
        array = np.asarray(nib.load(str(path)).dataobj)
        nifti(path, array, spacing=(1.0, 3.0, 3.0))

    faults = {name: broken(sandbox, name, damage) for name, damage in [
        ("label_shape", label_shape), ("nan_image", nan_image), ("float_labels", float_labels),
        ("undeclared_label", undeclared_label), ("negative_label", negative_label),
        ("non_consecutive", non_consecutive), ("traversal_ending", traversal_ending),
        ("bad_json", bad_json), ("geometry_mismatch", geometry_mismatch)]}
    injected = sandbox / "inputs" / "a;touch INJECTED_SEMI;true"
    shutil.copytree(dataset(sandbox / "inputs" / "clean"), injected)
    fingerprint_nan = inputs / "fingerprint_nan.json"
    fingerprint_nan.write_text('{"spacings": [[NaN, 1, 1]], "shapes_after_crop": [[1, 1, 1]]}')
    fingerprint_garbage = inputs / "fingerprint_garbage.json"
    fingerprint_garbage.write_text("[1, 2")
    read_only = out / "read_only"
    read_only.mkdir(parents=True)
    read_only.chmod(0o555)

    cases = [
        # predict: inputs the model cannot answer, outputs that would destroy something
        Case("predict_nan", ["predict", "--model", str(real), "-i", str(scans / "nan_0000.nii.gz"),
                             "-o", str(out / "p1" / "seg.nii.gz")], "nan_0000.nii.gz"),
        Case("predict_inf", ["predict", "--model", str(real), "-i", str(scans / "inf_0000.nii.gz"),
                             "-o", str(out / "p2" / "seg.nii.gz")], "inf_0000.nii.gz"),
        Case("predict_empty_file", ["predict", "--model", str(real), "-i",
                                    str(scans / "empty_0000.nii.gz"), "-o",
                                    str(out / "p3" / "seg.nii.gz")], "empty_0000.nii.gz"),
        Case("predict_text_file", ["predict", "--model", str(real), "-i",
                                   str(scans / "text_0000.nii.gz"), "-o",
                                   str(out / "p4" / "seg.nii.gz")], "text_0000.nii.gz"),
        Case("predict_singular_direction", ["predict", "--model", str(real), "-i",
                                            str(scans / "singular_0000.nii.gz"), "-o",
                                            str(out / "p5" / "seg.nii.gz")], "singular_0000"),
        Case("predict_output_is_input", ["predict", "--model", str(real), "-i", str(good),
                                         "-o", str(good)], "good_0000.nii.gz"),
        Case("predict_output_existing_text", ["predict", "--model", str(real), "-i", str(good),
                                              "-o", str(scans / "notes.txt")], "notes.txt"),
        Case("predict_unknown_suffix", ["predict", "--model", str(real), "-i", str(good),
                                        "-o", str(out / "p6" / "seg.xyz")], "seg.xyz"),
        Case("predict_read_only_output", ["predict", "--model", str(real), "-i", str(good),
                                          "-o", str(read_only / "seg.nii.gz")], "read_only",
             skip=os.geteuid() == 0),  # root writes into a read-only folder
        Case("predict_output_under_a_file", ["predict", "--model", str(real), "-i", str(good),
                                             "-o", str(scans / "notes.txt" / "seg.nii.gz")],
             "notes.txt"),
        Case("predict_output_is_folder", ["predict", "--model", str(real), "-i", str(good),
                                          "-o", str(scans)], "scans"),
        Case("predict_missing_input", ["predict", "--model", str(real), "-i",
                                       str(scans / "absent_0000.nii.gz"), "-o",
                                       str(out / "p7" / "seg.nii.gz")], "absent_0000.nii.gz"),
        Case("predict_zero_checkpoint", ["predict", "--model", str(zero), "-i", str(good), "-o",
                                         str(out / "p8" / "seg.nii.gz")], "zero_checkpoint"),
        Case("predict_pickle_checkpoint", ["predict", "--model", str(hostile), "-i", str(good),
                                           "-o", str(out / "p9" / "seg.nii.gz")],
             "pickle_checkpoint"),
        Case("predict_model_json_missing", ["predict", "--model", str(missing), "-i", str(good),
                                            "-o", str(out / "p10" / "seg.nii.gz")],
             "model.json"),
        Case("predict_model_json_garbage", ["predict", "--model", str(garbage), "-i", str(good),
                                            "-o", str(out / "p11" / "seg.nii.gz")],
             "model.json"),
        Case("predict_plans_zero_spacing", ["predict", "--model", str(zero_spacing), "-i",
                                            str(good), "-o", str(out / "p12" / "seg.nii.gz")],
             "plans.json"),
        Case("predict_missing_model", ["predict", "--model", str(models / "absent"), "-i",
                                       str(good), "-o", str(out / "p13" / "seg.nii.gz")],
             "absent"),
        Case("predict_device_tpu", ["predict", "--model", str(real), "-i", str(good), "-o",
                                    str(out / "p14" / "seg.nii.gz"), "--device", "tpu"], "tpu"),
        Case("predict_huge_resample", ["predict", "--model", str(real), "-i",
                                       str(scans / "big_spacing_0000.nii.gz"), "-o",
                                       str(out / "p15" / "seg.nii.gz")], "big_spacing"),
        Case("predict_zeros_warns", ["predict", "--model", str(real), "-i",
                                     str(scans / "zeros_0000.nii.gz"), "-o",
                                     str(out / "p16" / "seg.nii.gz")], "zeros_0000",
             warning=True),
        Case("predict_x1e30_warns", ["predict", "--model", str(real), "-i",
                                     str(scans / "huge_0000.nii.gz"), "-o",
                                     str(out / "p17" / "seg.nii.gz")], "huge_0000",
             warning=True),
        # register
        Case("register_nan", ["register", "--model", str(reg_model), "--moving",
                              str(scans / "nan_0000.nii.gz"), "--fixed", str(good), "-o",
                              str(out / "r1")], "nan_0000.nii.gz"),
        Case("register_zeros", ["register", "--model", str(reg_model), "--moving",
                                str(scans / "zeros_0000.nii.gz"), "--fixed", str(good), "-o",
                                str(out / "r2")], "zeros_0000.nii.gz"),
        # dataset stages
        *[Case(f"fingerprint_{name}", ["fingerprint", str(root), "-o",
                                       str(out / f"fp_{name}" / "fingerprint.json")],
               {"bad_json": "dataset.json", "traversal_ending": "file_ending",
                "non_consecutive": "consecutive"}.get(name, "case_00"))
          for name, root in faults.items()],
        *[Case(f"preprocess_{name}", ["preprocess", str(root), str(real / "plans.json"), "-o",
                                      str(out / f"pp_{name}")],
               {"bad_json": "dataset.json", "traversal_ending": "file_ending",
                "non_consecutive": "consecutive"}.get(name, "case_00"))
          for name, root in faults.items()],
        Case("plan_nan_fingerprint", ["plan", str(fingerprint_nan), "-o",
                                      str(out / "pl1" / "plans.json")], "fingerprint_nan.json"),
        Case("plan_garbage_fingerprint", ["plan", str(fingerprint_garbage), "-o",
                                          str(out / "pl2" / "plans.json")],
             "fingerprint_garbage.json"),
        Case("evaluate_folder_missing", ["evaluate-folder", str(inputs / "none"), str(scans),
                                         "--dataset", str(faults["label_shape"]), "-o",
                                         str(out / "ev1")], "none"),
        # CLI usage
        Case("usage_unknown_option", ["predict", "--modle", "x"], "--modle", exit_code=2),
        Case("usage_missing_argument", ["fingerprint"], "'dataset'", exit_code=2),
        Case("usage_bad_int", ["split", str(faults["label_shape"]), "--folds", "many"], "many",
             exit_code=2),
        Case("usage_unknown_command", ["trian-seg"], "trian-seg", exit_code=2),
        # a path that is a shell command, through the CLI (the workflow has its own test)
        Case("fingerprint_injected_path", ["fingerprint", str(injected), "-o",
                                           str(out / "inj" / "x" / "fingerprint.json"),
                                           "--workers", "notanumber"], "notanumber",
             exit_code=2),
    ]
    return cases


def run_case(case: Case, repo: Path, sandbox: Path) -> None:
    inputs = sandbox / "inputs"
    before = digest(inputs)
    outside_before = {p for p in sandbox.iterdir()}
    tmp_before = set(Path("/tmp").glob("escaped*"))
    env = {**os.environ, "PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": "",
           "LANG": "C.UTF-8"}
    result = subprocess.run([sys.executable, "-m", "medpipe.cli", *case.args],
                            capture_output=True, encoding="utf-8", errors="replace",
                            env=env, cwd=sandbox, timeout=900)
    case.stderr = result.stderr.strip()[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.warning:
        if result.returncode != 0:
            case.problems.append(f"exit {result.returncode}, expected a warning and exit 0")
        if not any(line.startswith("warning:") and case.must_name in line for line in lines):
            case.problems.append("no one-line warning naming the file")
    else:
        if result.returncode == 0:
            case.problems.append("exit 0")
        if case.exit_code is not None and result.returncode != case.exit_code:
            case.problems.append(f"exit {result.returncode}, expected {case.exit_code}")
        errors = [line for line in lines if not line.startswith("warning:")]
        usage = case.exit_code == 2
        if not usage and len(errors) != 1:
            case.problems.append(f"{len(errors)} error lines")
        if not any(case.must_name in line for line in errors):
            case.problems.append(f"no line names {case.must_name!r}")
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        case.problems.append("traceback")
    if digest(inputs) != before:
        case.problems.append("an input changed")
    new_outside = {p for p in sandbox.iterdir()} - outside_before
    if new_outside:
        case.problems.append(f"written outside the outputs: {sorted(map(str, new_outside))}")
    if set(Path("/tmp").glob("escaped*")) - tmp_before:
        case.problems.append("a file escaped to /tmp")
    for marker in ("INJECTED_PICKLE", "INJECTED_SEMI"):
        if list(sandbox.rglob(marker)):
            case.problems.append(f"{marker}: a command ran")
    case.ok = not case.problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reg-model", type=Path, required=True)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hostile_inputs.json"))
    parser.add_argument("--only", default="", help="run only the cases whose name has this")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medpipe-campaign-") as folder:
        sandbox = Path(folder)
        (sandbox / "outputs").mkdir()
        cases = [case for case in build_cases(sandbox, options.model.resolve(),
                                                   options.reg_model.resolve())
                 if options.only in case.name and not case.skip]
        for case in cases:
            run_case(case, options.repo.resolve(), sandbox)
            mark = "ok  " if case.ok else "FAIL"
            print(f"{mark} {case.name}: {'; '.join(case.problems) or case.stderr[-160:]}",
                  flush=True)
        (sandbox / "outputs" / "read_only").chmod(0o755)
    failed = [case for case in cases if not case.ok]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"repo": str(options.repo), "cases": len(cases),
                                       "failed": len(failed),
                                       "results": [asdict(case) for case in cases]}, indent=1))
    print(f"{len(cases) - len(failed)}/{len(cases)} cases refused as they must")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
