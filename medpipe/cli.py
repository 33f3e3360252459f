"""The `medpipe` command. Each sub-command parses its options and calls one library function.

User errors (`MedpipeError`) are printed as one message and exit non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand, TyperGroup

from medpipe.errors import DatasetError, MedpipeError, VerificationFailed

try:  # typer >= 0.25 carries its own copy of click, whose exceptions it raises
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException


class _FlagsWithoutType:
    """Help that shows a flag as `--mirror/--no-mirror` alone: Typer prints every option's
    type, and a flag's `<bool>` reads as if it wanted a value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Group(_FlagsWithoutType, TyperGroup):
    pass


class _Command(_FlagsWithoutType, TyperCommand):
    pass


# markdown: a docstring's single line breaks join into one paragraph, as they read in code
app = typer.Typer(
    name="medpipe",
    cls=_Group,
    help="3D medical image segmentation and registration pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from medpipe import __version__

        console.print(f"medpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", help="Print medpipe's version and exit.", callback=_print_version,
        is_eager=True)] = False,
) -> None:
    """3D medical image segmentation and registration pipeline."""


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


@app.command()
def verify(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net v2 raw layout).")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Allowed geometry difference (mm, direction cosines).")
    ] = 1e-4,
    workers: Annotated[int, typer.Option(help="Processes reading cases in parallel.")] = 1,
) -> None:
    """Check a dataset; list every problem, then exit 1 if any is an error."""
    from medpipe.data.verify import verify_dataset, write_report

    with _progress() as progress:
        task = progress.add_task("verifying", total=None)
        report = verify_dataset(
            dataset, tolerance, workers, on_case_checked=lambda _: progress.advance(task)
        )
    if json_out is not None:
        write_report(report, json_out)
    _print_problems(report.problems, dataset)
    summary = (
        f"{report.n_training} training and {report.n_test} test case(s)"
        + (f", {report.n_unlabelled} unlabelled" if report.n_unlabelled else "") + "; "
        f"{len(report.errors)} error(s), {len(report.problems) - len(report.errors)} warning(s)"
    )
    if not report.ok:
        raise VerificationFailed(summary, dataset)
    console.print(f"[green]ok[/green] {dataset}: {summary}")


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (or an earlier demo).")],
    cases: Annotated[int, typer.Option(help="Training cases.")] = 12,
    test_cases: Annotated[int, typer.Option(help="Test cases (imagesTs/labelsTs).")] = 2,
    unlabelled: Annotated[int, typer.Option(
        help="Extra training scans without labels (imagesTrUnlabelled), which only the "
        "registration networks train on.")] = 0,
    spacing: Annotated[
        str, typer.Option(help="Voxel size in mm: one number, or three like 1,1,4.")
    ] = "3",
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
) -> None:
    """Build the brain tissue demo dataset from the MNI152 template shipped with nilearn."""
    from medpipe.data.demo import DemoSettings, build_demo_dataset

    settings = DemoSettings(
        cases=cases, test_cases=test_cases, unlabelled=unlabelled,
        spacing=_parse_spacing(spacing), seed=seed
    )
    with _progress() as progress:
        task = progress.add_task("building cases", total=cases + test_cases + unlabelled)
        build_demo_dataset(out_dir, settings, on_case_written=lambda _: progress.advance(task))
    extra = f" + {unlabelled} unlabelled" if unlabelled else ""
    console.print(
        f"[green]wrote[/green] {out_dir}: {cases} training + {test_cases} test{extra} case(s) "
        f"at {spacing} mm; preview {out_dir / 'preview.png'}"
    )


@app.command()
def split(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net v2 raw layout).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="splits.json to write.")] = Path(
        "splits.json"
    ),
    folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    seed: Annotated[int, typer.Option(help="KFold seed (nnU-Net's is 12345).")] = 12345,
) -> None:
    """Write deterministic k-fold splits of the training cases (nnU-Net's rule and format)."""
    from medpipe.data import load_dataset, make_splits, write_splits

    splits = make_splits(load_dataset(dataset).case_ids, folds, seed)
    write_splits(splits, output)
    sizes = ", ".join(str(len(s["val"])) for s in splits)
    console.print(f"[green]wrote[/green] {output}: {folds} folds, validation sizes {sizes}")


@app.command()
def fingerprint(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net v2 raw layout).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="fingerprint.json to write.")],
    workers: Annotated[int, typer.Option(help="Processes reading cases in parallel.")] = 1,
) -> None:
    """Spacings, shapes and foreground intensity statistics of the training cases."""
    from medpipe.data import load_dataset
    from medpipe.planning import fingerprint_dataset, write_fingerprint

    total = len(load_dataset(dataset).training)
    with _progress() as progress:
        task = progress.add_task("fingerprinting", total=total)
        result = fingerprint_dataset(dataset, workers, lambda _: progress.advance(task))
    write_fingerprint(result, output)
    console.print(
        f"[green]wrote[/green] {output}: {len(result['cases'])} cases, median spacing "
        f"{_fmt(result['median_spacing'])} mm, "
        f"median shape {_fmt(result['median_shape_after_crop'])}"
    )


PlannerChoice = Literal["default", "ResEncM", "ResEncL", "ResEncXL"]  # planning.PLANNERS
CasesChoice = Literal["validation", "test"]


@app.command()
def plan(
    fingerprint_json: Annotated[Path, typer.Argument(help="fingerprint.json from `fingerprint`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="plans.json to write.")],
    gpu_memory_gb: Annotated[float | None, typer.Option(
        min=0.01, help="GPU memory the patch and batch size are planned for (default: the "
        "planner's target: 8 GB; ResEnc M / L / XL 8 / 24 / 40).")] = None,
    planner: Annotated[PlannerChoice, typer.Option(
        help="nnU-Net v2's planner to follow: default, or a Residual Encoder preset.")
    ] = "default",
) -> None:
    """nnU-Net-style plans: target spacing, normalisation, patch/batch size, topology."""
    from medpipe.planning import plan_experiment, read_fingerprint, write_plans

    plans = plan_experiment(read_fingerprint(fingerprint_json), gpu_memory_gb, planner)
    write_plans(plans, output)
    for name, config in plans.configurations.items():
        console.print(
            f"[green]{name}[/green]: spacing {_fmt(config.spacing)} mm, patch "
            f"{_fmt(config.patch_size)}, batch {config.batch_size}, "
            f"{config.architecture.arch_kwargs.n_stages} stages"
            f"{' (residual encoder)' if config.architecture.arch_kwargs.residual else ''}, "
            f"{', '.join(config.normalization_schemes)}"
        )
    console.print(f"[green]wrote[/green] {output}")


@app.command()
def preprocess(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net v2 raw layout).")],
    plans_json: Annotated[Path, typer.Argument(help="plans.json from `plan`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the cases.")],
    configuration: Annotated[str, typer.Option("--config", help="Plans configuration.")] = (
        "3d_fullres"
    ),
    case: Annotated[
        list[str] | None, typer.Option(help="Only these case ids (repeatable); labelled test "
                                       "cases too (registration scored on test pairs).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Cases preprocessed in parallel.")] = 1,
) -> None:
    """Crop, normalise and resample the training cases and the unlabelled training scans
    (imagesTrUnlabelled), or the cases named by --case; finished cases are not redone."""
    from medpipe.data import load_dataset
    from medpipe.planning import read_plans
    from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset

    raw = load_dataset(dataset)
    settings = PreprocessingPlan.from_plans(read_plans(plans_json), configuration)
    known = (raw.training + raw.unlabelled
             + tuple(c for c in raw.test if c.label is not None))
    cases = ([c for c in known if c.case_id in case] if case
             else list(raw.training + raw.unlabelled))
    unknown = set(case or []) - {c.case_id for c in known}
    if unknown:
        raise DatasetError(f"no training, unlabelled or labelled test case(s) "
                           f"{', '.join(sorted(unknown))}", dataset)
    classes = sorted(v for v in raw.spec.label_values if v > 0)
    with _progress() as progress:
        task = progress.add_task("preprocessing", total=len(cases))
        done = preprocess_dataset(
            cases, settings, output, classes, workers, lambda _: progress.advance(task)
        )
    console.print(
        f"[green]wrote[/green] {output}: {len(done)} case(s) preprocessed, "
        f"{len(cases) - len(done)} already done"
    )


ConfigOption = Annotated[Path, typer.Option("--config", help="Pipeline config (YAML).")]
ModelOption = Annotated[str, typer.Option("--model", help="Registered model name.")]
FoldOption = Annotated[int, typer.Option("--fold", help="Cross-validation fold.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. training.epochs=5 (repeatable)."),
]
RestartIfChangedOption = Annotated[bool, typer.Option(
    "--restart-if-changed",
    help="If the run folder holds a run with other settings, train from scratch instead of "
         "refusing (what the workflow does when the config changed).")]
RunDirOption = Annotated[
    Path | None, typer.Option("--run-dir", help="Run folder (default: RESULTS/runs/MODEL/fold_K).")
]
ProcessesOption = Annotated[int, typer.Option(
    "--processes", min=1,
    help="Processes training the one model together (DistributedDataParallel; one per GPU, "
         "else CPU processes): this command runs again under torchrun on this machine. "
         "Under torchrun or srun already: leave it at 1.")]


def _train_as(processes: int, model: str, fold: int, train) -> None:
    """Run TRAIN(this process's ranks) here, or this command again under torchrun when
    PROCESSES > 1 and no launcher started it; rank 0 alone says where the run went."""
    from medpipe.training.distributed import from_environment

    if _relaunched_under_torchrun(processes):
        return
    ranks = from_environment()
    folder = train(ranks)
    if ranks.is_main:
        console.print(f"[green]trained[/green] {model} fold {fold}: {folder}")


def _relaunched_under_torchrun(processes: int) -> bool:
    """Run this same command again as PROCESSES processes started by torchrun (one machine),
    when more than one is asked for and no launcher started this one; True when it ran."""
    from medpipe.training.distributed import from_environment

    if processes == 1 or from_environment().several:
        return False
    args, skip = [], False
    for arg in sys.argv[1:]:  # this command's own arguments, less --processes
        if skip or arg.startswith("--processes="):
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        args.append(arg)
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "medpipe.cli", *args]
    returncode = subprocess.run(command).returncode
    if returncode:
        raise typer.Exit(returncode)
    return True


@app.command("train-seg")
def train_seg(
    config: ConfigOption,
    model: ModelOption,
    fold: FoldOption = 0,
    overrides: SetOption = None,
    run_dir: RunDirOption = None,
    restart: Annotated[
        bool, typer.Option(help="Discard this run's checkpoints and train from scratch.")
    ] = False,
    restart_if_changed: RestartIfChangedOption = False,
    processes: ProcessesOption = 1,
) -> None:
    """Train a segmentation model on one fold; an interrupted run resumes where it stopped."""
    from medpipe.config import load_config
    from medpipe.training.segmentation import train_segmentation

    _train_as(processes, model, fold, lambda ranks: train_segmentation(
        load_config(config, overrides), model, fold, run_dir, restart,
        restart_if_changed=restart_if_changed, processes=ranks))


@app.command("evaluate-seg")
def evaluate_seg(
    config: ConfigOption,
    model: ModelOption,
    fold: FoldOption = 0,
    overrides: SetOption = None,
    run_dir: RunDirOption = None,
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
    mirror: Annotated[bool, typer.Option(help="Mirroring test-time augmentation.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    cases: Annotated[CasesChoice, typer.Option(
        help="validation: the fold's validation cases (RUN/evaluation); test: the labelled "
             "test cases, preprocessed (RUN/evaluation_test), so that repeated runs pair on "
             "the same cases.")] = "validation",
) -> None:
    """Score a trained fold on its validation cases (or the test cases), on the raw grid:
    Dice, HD95, volumes."""
    from medpipe.config import load_config
    from medpipe.evaluation.segmentation import evaluate_segmentation

    summary = evaluate_segmentation(
        load_config(config, overrides), model, fold, run_dir, checkpoint, mirror, device,
        cases)
    _print_classes(summary)
    console.print(f"[green]mean Dice[/green] {summary['mean_dice']['mean']:.3f} over "
                  f"{summary['cases']} case(s)")


@app.command("evaluate-folder")
def evaluate_folder_command(
    references: Annotated[Path, typer.Argument(help="Folder of reference label maps.")],
    predictions: Annotated[Path, typer.Argument(help="Folder of predicted label maps.")],
    dataset: Annotated[Path, typer.Option(
        help="Dataset folder whose dataset.json names the labels and file ending.")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Folder for cases.csv and summary.json (default: "
        "PREDICTIONS/evaluation).")] = None,
) -> None:
    """Score a folder of predictions against references (Dice, HD95, volumes per class or
    region), as nnU-Net's nnUNetv2_evaluate_folder: files pair by name."""
    from medpipe.evaluation.folder import evaluate_folder

    summary = evaluate_folder(references, predictions, dataset,
                              output or predictions / "evaluation")
    _print_classes(summary)
    console.print(f"[green]mean Dice[/green] {summary['mean_dice']['mean']:.3f} over "
                  f"{summary['cases']} case(s)")


@app.command("sync-tracking")
def sync_tracking(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (RESULTS/runs/MODEL/fold_K).")],
) -> None:
    """Send a run's tracking calls that waited while its MLflow store was away
    (RUN/tracking_pending.jsonl) to the store named in the run's config.json."""
    import json

    from medpipe.config import PipelineConfig
    from medpipe.runs.folder import RunFolder
    from medpipe.runs.spec import read_run_spec
    from medpipe.tracking import open_tracker

    folder = RunFolder(run_dir)
    if not folder.tracking_journal.is_file():
        console.print(f"nothing waits in {folder.tracking_journal}")
        return
    spec = read_run_spec(folder)
    try:
        config = PipelineConfig(**json.loads(folder.config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise MedpipeError(f"cannot read the run's config ({error})",
                           folder.config_file) from None
    if config.tracking_store is None:
        raise MedpipeError("tracking is off in this run's config", folder.config_file)
    tracker = open_tracker(config.tracking_store, spec.dataset_name, spec.run_name, folder)
    waiting = tracker.pending
    if waiting:
        raise MedpipeError(f"the store did not take the {waiting} waiting call(s); they "
                           "stay in the journal", folder.tracking_journal)
    console.print(f"sent the waiting tracking calls of {run_dir}")


@app.command("train-reg")
def train_reg(
    config: ConfigOption,
    model: Annotated[str, typer.Option(
        "--model", help="A registration network: pyramid, voxelmorph or voxelmorph_diff.")],
    fold: FoldOption = 0,
    atlas: Annotated[
        str | None, typer.Option(help="Register every case to this case id (atlas-based).")
    ] = None,
    overrides: SetOption = None,
    run_dir: RunDirOption = None,
    restart: Annotated[
        bool, typer.Option(help="Discard this run's checkpoints and train from scratch.")
    ] = False,
    restart_if_changed: RestartIfChangedOption = False,
    processes: ProcessesOption = 1,
) -> None:
    """Train a registration network on one fold's training pairs; resumes when interrupted."""
    from medpipe.config import load_config
    from medpipe.training.registration import train_registration

    overrides = list(overrides or []) + ([f"registration.atlas={atlas}"] if atlas else [])
    _train_as(processes, model, fold, lambda ranks: train_registration(
        load_config(config, overrides), model, fold, run_dir, restart,
        restart_if_changed=restart_if_changed, processes=ranks))


@app.command("evaluate-reg")
def evaluate_reg(
    config: ConfigOption,
    model: Annotated[str, typer.Option(
        "--model", help="A trained registration network; NETWORK_io: that network with "
        "instance optimisation; or identity / classical / ants / ants_standard.")],
    fold: FoldOption = 0,
    overrides: SetOption = None,
    run_dir: RunDirOption = None,
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    network_dir: Annotated[Path | None, typer.Option(
        "--network-dir", help="For NETWORK_io: the network's run folder (default: "
        "RESULTS/runs/NETWORK/fold_K).")] = None,
    amp: Annotated[bool, typer.Option(
        help="A network: mixed precision where the device computes it natively (bf16 on a "
        "GPU or a CPU with AVX-512 BF16/AMX; its geometry stays float32); --no-amp: float32 "
        "throughout.")] = True,
) -> None:
    """Score a registration method on held-out pairs (the fold's validation cases, or the
    labelled test cases with registration.eval_cases=test): Dice of warped labels,
    HD95, folding, SDlogJ and seconds per pair."""
    from medpipe.config import load_config
    from medpipe.evaluation.registration import evaluate_registration

    summary = evaluate_registration(load_config(config, overrides), model, fold, run_dir,
                                    checkpoint, device, network_dir, amp)
    _print_classes(summary)
    console.print(
        f"[green]mean Dice[/green] {summary['mean_dice']['mean']:.3f} over {summary['pairs']} "
        f"pair(s); folding {summary['folding_percent']['mean']:.3f}%, SDlogJ "
        f"{summary['sdlogj']['mean']:.3f}, {summary['seconds']['mean']:.2f} s/pair",
        highlight=False,
    )


DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


@app.command()
def predict(
    model: Annotated[str, typer.Option(
        "--model", help="Run folder, fold_* folder, checkpoint, or models:/ URI; a .onnx "
        "file of `medpipe export` with --backend onnxruntime.")],
    input: Annotated[Path, typer.Option("-i", "--input", help="A scan, or a folder of them.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A file, or a folder.")],
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
    mirror: Annotated[bool, typer.Option(help="Mirroring test-time augmentation.")] = False,
    probabilities: Annotated[bool, typer.Option(
        help="Also write CASE_probabilities (float32, one component per label).")] = False,
    device: DeviceOption = "auto",
    postprocessing: Annotated[Path | None, typer.Option(
        "--postprocessing", help="postprocessing.json from `medpipe postprocessing`: keep "
        "the largest component where cross-validation said it helps.")] = None,
    amp: Annotated[bool, typer.Option(
        help="torch: mixed precision where the device computes it natively (bf16 on a GPU "
        "or a CPU with AVX-512 BF16/AMX); --no-amp: float32 throughout.")] = True,
    output_format: Annotated[Literal["auto", "dicom-seg"], typer.Option(
        "--format", metavar="FORMAT", help="dicom-seg: a DICOM Segmentation referencing "
        "the input DICOM series; auto: that for a DICOM series in and a .dcm name out, else "
        "the output name's format (NIfTI, NRRD, MHA, or a DICOM series for a name without "
        "suffix).")
    ] = "auto",
    backend: Annotated[Literal["torch", "onnxruntime"], typer.Option(
        help="What runs the network: torch, or onnxruntime for a .onnx model (CPU, fp32); "
        "preprocessing and sliding windows are medpipe's either way.")] = "torch",
) -> None:
    """Segment new scans; results lie on each input's exact grid. A folder uses nnU-Net's
    naming: CASE_0000.nii.gz (channel 0), ... in; CASE.nii.gz out."""
    from medpipe.inference.files import plan_predictions, writes_dicom_seg
    from medpipe.inference.segmenter import load_segmenter
    from medpipe.postprocessing import read_postprocessing

    steps = read_postprocessing(postprocessing) if postprocessing is not None else None
    segmenter = load_segmenter(model, checkpoint, device, backend, amp)
    segmenter.postprocessing = steps
    jobs = plan_predictions(input, output, segmenter.channels)
    dicom_seg = [writes_dicom_seg(channels[0], target, output_format)
                 for channels, target in jobs]
    with _progress() as progress:
        task = progress.add_task("predicting", total=len(jobs))
        for (channels, target), seg in zip(jobs, dicom_seg, strict=True):
            segmenter.predict_files([channels], [target], mirror=mirror,
                                    probabilities=probabilities, dicom_seg=seg)
            progress.advance(task)
    console.print(f"[green]wrote[/green] {len(jobs)} prediction(s) to {output}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(
        help="One trained fold: its run folder, a checkpoint, or a models:/ URI.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
) -> None:
    """Export a trained fold's network to ONNX, its run description and plans inside as
    metadata; `predict` (segmentation) or `register` (registration, its transform included)
    with `--backend onnxruntime --model FILE.onnx` runs it."""
    from medpipe.inference.onnx_backend import export_onnx

    written = export_onnx(model, output, checkpoint)
    console.print(f"[green]wrote[/green] {written} ({written.stat().st_size / 2**20:.1f} MB)")


@app.command("postprocessing")
def postprocessing_command(
    model_dir: Annotated[Path, typer.Argument(
        help="A model's folder holding its fold_K run folders, each evaluated.")],
    dataset: Annotated[Path, typer.Option(
        help="The dataset whose labelsTr are the references.")],
) -> None:
    """Decide nnU-Net's postprocessing on the folds' validation predictions (keep the
    largest component of the foreground, then of each class, where that raises the
    cross-validation Dice); writes MODEL_DIR/postprocessing.json for `predict
    --postprocessing`."""
    from medpipe.data.labels import LabelScheme
    from medpipe.data.layout import read_spec
    from medpipe.postprocessing import postprocessing_for_model

    spec = read_spec(dataset)
    scheme = LabelScheme.from_labels(spec.labels, spec.regions_class_order)
    decision = postprocessing_for_model(model_dir, dataset / "labelsTr", scheme,
                                        spec.file_ending)
    console.print(f"largest component kept for: {', '.join(decision.chosen) or 'nothing'} "
                  f"({decision.cases} cases; mean Dice {_mean(decision.dice_before):.4f} -> "
                  f"{_mean(decision.dice_after):.4f})")
    console.print(f"[green]wrote[/green] {model_dir / 'postprocessing.json'}")


def _mean(values: dict[str, float]) -> float:
    finite = [v for v in values.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


@app.command()
def register(
    model: Annotated[str, typer.Option(
        "--model", help="Registration run folder, checkpoint, or models:/ URI.")],
    moving: Annotated[Path, typer.Option(help="The scan to warp.")],
    fixed: Annotated[Path, typer.Option(help="The scan whose grid the results lie on.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the results.")],
    moving_labels: Annotated[
        Path | None, typer.Option(help="Label map of the moving scan to warp as well.")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
    device: DeviceOption = "auto",
    refine_steps: Annotated[int, typer.Option(
        "--refine-steps", min=0, help="Instance optimisation: refine the network's field by "
        "this many steps on this pair (0: forward passes only).")] = 0,
    refine_spacing: Annotated[float | None, typer.Option(
        "--refine-spacing", min=0.01, help="Run the refinement on a grid of this spacing (mm, "
        "isotropic) instead of the network's; finer resolves more, at more time per step.")
    ] = None,
    backend: Annotated[Literal["torch", "onnxruntime"], typer.Option(
        help="What runs the network: torch, or onnxruntime for a .onnx model of `medpipe "
        "export` (CPU, fp32).")] = "torch",
) -> None:
    """Register MOVING to FIXED: warped.nii.gz, field.nii.gz (ITK displacement field, LPS
    mm) and warped_labels.nii.gz in OUTPUT, all on the fixed scan's grid."""
    from medpipe.inference.registrator import load_registrator

    spacing = None if refine_spacing is None else (refine_spacing,) * 3
    registrator = load_registrator(model, checkpoint, device, refine_steps, spacing, backend)
    result = registrator.register(moving, fixed, moving_labels)
    for name, path in result.write(output).items():
        console.print(f"[green]wrote[/green] {name}: {path}")


@app.command()
def compare(
    experiment: Annotated[str | None, typer.Option(
        help="MLflow experiment (default: the config's, else the dataset's name).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder.")] = Path(
        "compare"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: the config's, else "
                                      "$MLFLOW_TRACKING_URI).")
    ] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Pipeline config: where its runs were tracked (by default "
        "RESULTS/mlflow.db).")] = None,
    overrides: SetOption = None,
    results: Annotated[Path | None, typer.Option(
        "--results", help="The workflow's results folder (default with --config: the "
        "config's): its test-set evaluations (test/MODEL/evaluation/cases.csv, used when "
        "every model has one, else the cross-validation cases) and postprocessing "
        "decisions.")] = None,
    runs_from: Annotated[Path | None, typer.Option(
        "--runs", help="Build the report from an archive of runs (written by --archive; "
        "several parts of a study archived into one folder) instead of an MLflow store; "
        "nothing is logged.")] = None,
    archive: Annotated[Path | None, typer.Option(
        "--archive", help="Also archive the compared runs (no models) and the results' "
        "files the report reads into this folder, added to what it holds.")] = None,
) -> None:
    """Compare every finished model of an experiment: tables, paired statistics, figures;
    report.md + report.html, logged to a parent MLflow run."""
    from medpipe import tracked
    from medpipe.config import load_config
    from medpipe.report.compare import build_report, champions, headline_scores, report_numbers
    from medpipe.tracking import (
        finished_runs,
        log_parent_run,
        set_champion,
        unfinished_runs,
        write_comparison_view,
    )

    if runs_from is not None:
        from medpipe.report.archive import archived_runs

        if (archive is not None or config is not None or tracking_uri is not None
                or experiment is not None or overrides):
            raise MedpipeError("--runs builds the report from an archive alone: give it "
                               "without --archive, --config, --set, --tracking-uri or "
                               "--experiment")

        runs = archived_runs(runs_from)
        build_report(runs, output, results or runs_from, (), runs_from)
        console.print(f"[green]wrote[/green] {output / 'report.html'} ({len(runs)} archived "
                      f"runs of {runs_from})")
        return
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    dataset = None
    if config is not None:
        pipeline = load_config(config, overrides)
        results = results or pipeline.results
        dataset = pipeline.dataset
        store = pipeline.tracking_store
        if store is None:
            raise MedpipeError("tracking is off in this config: the report is built from "
                               "MLflow runs", config)
        uri = tracking_uri or store.uri
        if experiment is None:
            from medpipe.planning import read_plans

            experiment = store.experiment or read_plans(pipeline.plans_file).dataset_name
    if experiment is None:
        raise MedpipeError("name the experiment (--experiment) or give the --config")
    if not uri:
        raise MedpipeError("say where the runs were tracked: --config, --tracking-uri or "
                           "$MLFLOW_TRACKING_URI")
    runs = finished_runs(uri, experiment)
    if archive is not None:
        from medpipe.report.archive import archive_runs

        archive_runs(runs, archive, results, dataset)
        console.print(f"archived {len(runs)} runs in {archive}")
        if results is None:
            console.print("[yellow]without --results or --config the archive holds no fold "
                          "ensemble scores, postprocessing decisions or job times[/yellow]")
    summary = build_report(runs, output, results, unfinished_runs(uri, experiment), dataset)
    files = [output / "report.html", output / "report.md", output / "summary.json",
             *(output / figure["file"] for figure in summary["figures"])]
    headline = headline_scores(summary)
    scopes = {key: summary[key] for key in ("segmentation_scope", "registration_scope")}
    log_parent_run(uri, experiment, report_numbers(runs, summary), files, headline, scopes)
    address = write_comparison_view(uri, experiment)
    console.print(f"[green]wrote[/green] {output / 'report.html'} ({len(runs)} runs)")
    console.print(f"MLflow's runs table of the comparison: `mlflow ui --backend-store-uri "
                  f"{uri}`, then http://127.0.0.1:5000/{address}", highlight=False)
    for run in champions(runs):
        name = run.tags[tracked.REGISTERED_MODEL]
        set_champion(uri, name, int(run.tags[tracked.REGISTERED_VERSION]))
        console.print(f"[green]champion[/green] models:/{name}@champion is "
                      f"{run.tags[tracked.MODEL]} fold {run.tags[tracked.FOLD]}")


def _print_classes(summary: dict) -> None:
    """Dice and HD95 per class of an evaluation summary, one line each."""
    for name, values in summary["classes"].items():
        console.print(
            f"{name:<16} Dice {values['dice']['mean']:.3f} +- {values['dice']['std']:.3f}  "
            f"HD95 {values['hd95']['mean']:.2f} mm", highlight=False,
        )


@app.command()
def init(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (nnU-Net v2 raw layout).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Config file to write.")] = Path(
        "config.yaml"),
    results: Annotated[Path, typer.Option(help="Folder the workflow writes into.")] = Path(
        "results"),
    force: Annotated[bool, typer.Option(help="Replace an existing config file.")] = False,
) -> None:
    """Write a complete, commented pipeline config for DATASET: every setting with its
    default and what it does, every model with its options."""
    from medpipe.config_template import config_template
    from medpipe.data.layout import read_spec
    from medpipe.io import atomic_output

    spec = read_spec(dataset)
    if output.exists() and not force:
        raise MedpipeError("exists; pass --force to replace it", output)
    with atomic_output(output) as staging:
        staging.write_text(config_template(dataset, spec, results), encoding="utf-8")
    console.print(f"[green]wrote[/green] {output}; run: snakemake all --profile "
                  f"configs/profiles/local --configfile {output}")


@app.command("config-schema")
def config_schema(
    output: Annotated[Path, typer.Option("-o", "--output", help="schema.yaml to write.")] = Path(
        "configs/schema.yaml"),
    reference: Annotated[Path, typer.Option(help="The settings reference (Markdown).")] = Path(
        "docs/settings.md"),
) -> None:
    """Write the pipeline config's JSON schema, which the Snakefile validates every config
    against, and the settings reference, both from medpipe's own config types."""
    from medpipe.config import write_schema
    from medpipe.config_template import settings_reference
    from medpipe.io import atomic_output

    write_schema(output)
    reference.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(reference) as staging:
        staging.write_text(settings_reference(), encoding="utf-8")
    console.print(f"[green]wrote[/green] {output} and {reference}")


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _parse_spacing(text: str) -> float | tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected a number or three, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 3:
        return (values[0], values[1], values[2])
    raise typer.BadParameter(f"expected one or three numbers, got {len(values)}")


def _print_problems(problems: list, root: Path) -> None:
    """One line per problem, "severity check file: message", so logs stay greppable."""
    for problem in problems:
        colour = "red" if problem.severity == "error" else "yellow"
        try:
            shown = problem.file.relative_to(root)
        except ValueError:
            shown = problem.file
        console.print(
            f"[{colour}]{problem.severity:<7}[/{colour}] {problem.check:<22} {shown}: "
            f"{escape(problem.message)}",
            soft_wrap=True,
            highlight=False,
        )


_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """medpipe's own warnings as one line each; any other library's as Python shows it."""
    from medpipe.inference.plausibility import ImplausibleInput

    if issubclass(category, ImplausibleInput):
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(str(message))}",
                          highlight=False)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def _given_value(param, argv: list[str]) -> str | None:
    """What the user typed for an option that failed to parse (click's message omits it)."""
    for name in getattr(param, "opts", None) or []:
        if not name.startswith("-"):
            continue
        for index, word in enumerate(argv):
            if word == name and index + 1 < len(argv):
                return argv[index + 1]
            if word.startswith(name + "="):
                return word[len(name) + 1:]
    return None


for _info in app.registered_commands:  # every command's help as the group's
    _info.cls = _Command


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    warnings.showwarning = _show_warning
    try:
        result = app(prog_name="medpipe", standalone_mode=False)
    except MedpipeError as error:
        err_console.print(f"[bold red]error:[/bold red] {error}", highlight=False)
        sys.exit(error.exit_code)
    except ClickException as error:  # a usage error: what is wrong, and where help is
        message = error.format_message()
        if message:  # (no message: the help was shown instead, as for a bare `medpipe`)
            context = getattr(error, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            given = _given_value(getattr(error, "param", None), sys.argv[1:])
            message += f" (got {given!r})" if given is not None and given not in message else ""
            err_console.print(f"[bold red]error:[/bold red] {escape(message)}{hint}",
                              highlight=False)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as error:  # reading or writing: a full disk, a read-only folder, ...
        where = f"{error.filename}: " if error.filename else ""
        err_console.print(f"[bold red]error:[/bold red] {escape(where)}"
                          f"{escape(error.strerror or str(error))}", highlight=False)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
