"""`medpipe compare`: one report across every model, built from the MLflow runs (costs,
budgets, recipes, per-case validation scores) and the workflow's test-set evaluations.

Segmentation is scored on the held-out test set (`RESULTS/test/MODEL/evaluation/cases.csv`,
the fold ensemble's predictions of imagesTs) when every model has one, else on the
cross-validation cases of the trained folds; registration on the pairs its evaluations
scored (test pairs with `registration.eval_cases: test`, else validation pairs). Every
table shows the spread over cases (not over folds), is sorted by the score and marks the
winner; every pair of methods gets a paired comparison over the same cases
(`report.statistics`: Wilcoxon with Holm's correction, effect sizes, an interval where n
allows). Each model's budget (samples seen, seconds) is stated and an unequal comparison
flagged. Written as `report.md` and a self-contained `report.html` (`report.render`), and
logged to a parent MLflow run under which the compared runs are nested.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import tracked
from medpipe.errors import MedpipeError
from medpipe.io import write_json
from medpipe.report.render import ratio_text
from medpipe.report.statistics import holm, paired_difference, shows_difference
from medpipe.tracking import TrackedRun, UnfinishedRun

UNEQUAL_BUDGET = 1.05  # samples seen differing by more than 5 % make a comparison unequal

BASELINES = {
    "identity": "no registration: the moving scan as it is, centres of mass matched (the floor)",
    "classical": "SimpleITK: affine (Mattes mutual information) then diffeomorphic demons, "
                 "iterated per pair",
    "ants": "ANTsPy SyN (quick default: affine, then SyN with Mattes mutual information at "
            "40x20x0 iterations, the finest level skipped), iterated per pair",
    "ants_standard": "ANTs' standard preset antsRegistrationSyN[s] (by ANTsPy): rigid and "
                     "affine (mutual information), then SyN[0.2,3,0] with cross-correlation "
                     "(radius 2) at 100x70x50x20 iterations down to full resolution, iterated "
                     "per pair",
}


@dataclass
class Scores:
    """One method's per-case results: case key -> class -> value, for Dice and HD95."""

    dice: dict[tuple, dict[str, float]] = field(default_factory=dict)
    hd95: dict[tuple, dict[str, float]] = field(default_factory=dict)

    def mean_dice(self) -> dict[tuple, float]:
        """Per case, the mean Dice over its scored classes."""
        return {key: float(np.mean(list(v.values()))) for key, v in self.dice.items() if v}

    def classes(self) -> list[str]:
        return sorted({name for values in self.dice.values() for name in values})


def read_scores(path: str | Path, key_columns: Sequence[str], prefix: tuple = ()) -> Scores:
    """Scores from an evaluation's cases.csv (or pairs.csv): one row per case and class."""
    scores = Scores()
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = (*prefix, *(row[c] for c in key_columns))
            for metric, table in (("dice", scores.dice), ("hd95", scores.hd95)):
                value = float(row.get(metric) or "nan")
                if not math.isnan(value):
                    table.setdefault(key, {})[row["class"]] = value
    return scores


def build_report(runs: Sequence[TrackedRun], out_dir: Path, results: Path | None = None,
                 unfinished: Sequence[UnfinishedRun] = ()) -> dict[str, Any]:
    """Tables, statistics and figures from RUNS (`tracking.finished_runs`) and, in the
    workflow's RESULTS folder, the test-set evaluations and postprocessing decisions; files
    in OUT_DIR. UNFINISHED runs (`tracking.unfinished_runs`) without a finished run of the
    same model and fold are listed as not compared, with the reason."""
    from medpipe.report import figures, render

    segmentation = [r for r in runs if r.tags.get(tracked.TASK) == "segmentation"]
    registration = [r for r in runs if r.tags.get(tracked.TASK) == "registration"]
    if not segmentation and not registration:
        raise MedpipeError("no finished segmentation or registration runs to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_models = _by_model(segmentation)
    seg_scores, seg_scope = _segmentation_scores(
        seg_models, results / "test" if results is not None else None)
    reg_methods = _by_model([r for r in registration if "pairs.csv" in r.files])
    reg_scores = {m: _pooled(folds, "pairs.csv", ("moving", "fixed"))
                  for m, folds in reg_methods.items()}
    reg_scope = _registration_scope(reg_methods, reg_scores)
    table = _table(seg_models, seg_scores, "segmentation")
    reg_table = _table(reg_methods, reg_scores, "registration")
    paired = _paired(seg_scores, table)
    reg_paired = _paired(reg_scores, reg_table)
    summary = {
        "segmentation_scope": seg_scope,
        "segmentation": table,
        "paired": paired,
        "verdicts": [_verdict(row, "segments") for row in paired],
        "budgets": _budget_check(table),
        "registration_scope": reg_scope,
        "registration": reg_table,
        "registration_paired": reg_paired,
        "registration_verdicts": [_verdict(row, "registers") for row in reg_paired],
        "methods": [_describe(row, runs_of, results) for row, runs_of in
                    [*((r, seg_models[r["model"]]) for r in table),
                     *((r, reg_methods[r["model"]]) for r in reg_table)]],
        "figures": [],
        "examples": _examples(segmentation + registration, out_dir),
        "did_not_finish": _did_not_finish(runs, unfinished),
    }
    summary["headline"] = _headlines(summary)
    if seg_scores:
        order = [row["model"] for row in table]
        summary["figures"].append(figures.per_case(
            {m: seg_scores[m].mean_dice() for m in order}, out_dir / "dice_per_case.png",
            f"Mean Dice per case ({seg_scope}; a line joins one case across models)"))
    if reg_scores:
        order = [row["model"] for row in reg_table]
        summary["figures"].append(figures.per_case(
            {m: reg_scores[m].mean_dice() for m in order}, out_dir / "registration_per_pair.png",
            f"Mean Dice of warped labels per pair ({reg_scope}; a line joins one pair)"))
        frontier = figures.accuracy_versus_speed(reg_table, out_dir / "dice_versus_speed.png",
                                                 reg_scope)
        if frontier is not None:
            summary["figures"].append(frontier)
    curves = [r for r in segmentation + registration if r.val_dice_history]
    if curves:
        summary["figures"].append(figures.dice_versus_cost(
            curves, {row["model"]: row for row in table + reg_table},
            out_dir / "dice_versus_cost.png"))
    write_json(summary, out_dir / "summary.json")
    render.write_reports(summary, out_dir)
    return summary


def champions(runs: Sequence[TrackedRun]) -> list[TrackedRun]:
    """Per task, the registered run with the best evaluated mean Dice: the model the registry
    alias `champion` points at after a comparison."""
    best: dict[str, TrackedRun] = {}
    for run in runs:
        score = run.metrics.get(tracked.EVAL_MEAN_DICE)
        if tracked.REGISTERED_VERSION not in run.tags or score is None or math.isnan(score):
            continue
        task = run.tags[tracked.TASK]
        if task not in best or score > best[task].metrics[tracked.EVAL_MEAN_DICE]:
            best[task] = run
    return list(best.values())


def report_numbers(runs: Sequence[TrackedRun], summary: dict) -> dict[str, dict[str, float]]:
    """Per compared run, its model's headline numbers in the report (mean Dice over the
    report's cases, mean training minutes per fold; NaN where there is none), which
    `compare` logs on each run so MLflow's runs table shows them side by side."""
    rows = {(task, row["model"]): row for task in ("segmentation", "registration")
            for row in summary[task]}
    numbers = {}
    for run in runs:
        row = rows.get((run.tags.get(tracked.TASK), run.tags.get(tracked.MODEL)))
        if row is not None:
            seconds = row.get("training_s")
            numbers[run.run_id] = {
                tracked.REPORT_MEAN_DICE: float(row["mean_dice"][0]),
                tracked.TRAINING_MINUTES: math.nan if seconds is None else seconds / 60}
    return numbers


# --------------------------------------------------------------------------- scores


def _by_model(runs: Sequence[TrackedRun]) -> dict[str, list[TrackedRun]]:
    out: dict[str, list[TrackedRun]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: int(r.tags.get(tracked.FOLD, 0))):
        out[run.tags[tracked.MODEL]].append(run)
    return dict(out)


def _pooled(folds: Sequence[TrackedRun], name: str, key_columns: Sequence[str]) -> Scores:
    """Every fold's cases (keyed by fold and case): the cross-validation scores."""
    pooled = Scores()
    for run in folds:
        if name in run.files:
            scores = read_scores(run.files[name], key_columns, (run.tags.get(tracked.FOLD),))
            pooled.dice.update(scores.dice)
            pooled.hd95.update(scores.hd95)
    return pooled


def _segmentation_scores(models: dict[str, list[TrackedRun]], test_results: Path | None,
                         ) -> tuple[dict[str, Scores], str]:
    """The test set's scores when every model has them, else the cross-validation cases'."""
    test_files = {m: test_results / m / "evaluation" / "cases.csv" for m in models} \
        if test_results is not None else {}
    if models and test_files and all(path.is_file() for path in test_files.values()):
        scores = {m: read_scores(path, ("case_id",)) for m, path in test_files.items()}
        n = len(next(iter(scores.values())).dice)
        return scores, f"test set, n = {n} cases"
    scores = {m: _pooled(folds, "cases.csv", ("case_id",)) for m, folds in models.items()}
    scores = {m: s for m, s in scores.items() if s.dice}
    n = len(next(iter(scores.values())).dice) if scores else 0
    return scores, f"cross-validation cases, n = {n}"


def _registration_scope(methods: dict[str, list[TrackedRun]],
                        scores: dict[str, Scores]) -> str:
    """Which pairs registration was scored on: the test cases' when every evaluation says
    so (`registration.eval_cases: test`), else the trained folds' validation cases'."""
    runs = [run for folds in methods.values() for run in folds]
    test = bool(runs) and all(r.tags.get(tracked.EVAL_CASES) == "test" for r in runs)
    n = max((len(s.dice) for s in scores.values()), default=0)
    return f"test pairs, n = {n}" if test else f"validation pairs, n = {n}"


def _spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over cases (ddof 1; NaN for a single case)."""
    array = np.asarray([v for v in values if not math.isnan(v)], float)
    if not len(array):
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _metric(runs: Sequence[TrackedRun], name: str) -> float:
    values = [r.metrics[name] for r in runs if name in r.metrics]
    return float(np.mean(values)) if values else math.nan


def _table(models: dict[str, list[TrackedRun]], scores: dict[str, Scores],
           task: str) -> list[dict[str, Any]]:
    """One row per method, best mean Dice first: scores as (mean, sd over cases), costs as
    the mean over folds."""
    rows = []
    for model, folds in models.items():
        score = scores.get(model, Scores())
        row: dict[str, Any] = {"model": model, "folds": len(folds), "cases": len(score.dice),
                               "mean_dice": _spread(list(score.mean_dice().values()))}
        for name in score.classes():
            row[f"dice_{name}"] = _spread([v[name] for v in score.dice.values() if name in v])
        row["hd95_mm"] = _spread([float(np.mean(list(v.values())))
                                  for v in score.hd95.values() if v])
        costs = {"training_s": tracked.TRAINING_SECONDS, "samples_seen": tracked.SAMPLES_SEEN,
                 "parameters": tracked.PARAMETERS, "peak_memory_mb": tracked.PEAK_MEMORY_MB,
                 "inference_s_per_case": tracked.EVAL_SECONDS_PER_CASE if task ==
                 "segmentation" else tracked.EVAL_SECONDS_PER_PAIR}
        for key, metric in costs.items():
            row[key] = _metric(folds, metric)
        if task == "registration":
            for key, metric in (("folding_percent", tracked.EVAL_FOLDING_PERCENT),
                                ("sdlogj", tracked.EVAL_SDLOGJ),
                                ("dice30_learn2reg", tracked.EVAL_DICE30),
                                ("hd95_voxels_learn2reg", tracked.EVAL_MEAN_HD95_VOXELS),
                                ("sdlogj_learn2reg", tracked.EVAL_SDLOGJ_LEARN2REG)):
                row[key] = _metric(folds, metric)
        row["device"] = next((r.tags[tracked.DEVICE] for r in folds
                              if tracked.DEVICE in r.tags), None)
        rows.append(row)
    rows.sort(key=lambda r: -r["mean_dice"][0] if not math.isnan(r["mean_dice"][0]) else 1)
    if rows and not math.isnan(rows[0]["mean_dice"][0]):
        rows[0]["winner"] = True
    return rows


# --------------------------------------------------------------------------- statistics


COSTS = {"parameters": "parameters", "training_s": "training time",
         "inference_s_per_case": "inference time", "peak_memory_mb": "peak memory"}


def _paired(scores: dict[str, Scores], table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of methods (better-scoring first) over the cases both were scored on, the
    p-values Holm-corrected across the pairs, with a's costs relative to b's."""
    order = [row["model"] for row in table if row["model"] in scores]
    by_model = {row["model"]: row for row in table}
    rows = []
    for a, b in itertools.combinations(order, 2):
        first, second = scores[a].mean_dice(), scores[b].mean_dice()
        shared = sorted(set(first) & set(second))
        if not shared:
            continue
        row = {"a": a, "b": b, **paired_difference([first[k] for k in shared],
                                                   [second[k] for k in shared])}
        for key in COSTS:
            top, bottom = by_model[a].get(key, math.nan), by_model[b].get(key, math.nan)
            row[f"{key}_ratio"] = top / bottom if bottom and not math.isnan(bottom) \
                else math.nan
        rows.append(row)
    for row, adjusted in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
        row["holm_p"] = adjusted
    return rows


def _verdict(row: dict[str, Any], verb: str) -> str:
    """The paired comparison in one sentence: is a better than b, and at what cost?"""
    a, b, n = row["a"], row["b"], row["n"]
    interval = (f"95% CI [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
                if not math.isnan(row["ci_low"]) else f"no interval with n = {n} < 10")
    evidence = (f"mean Dice difference {row['mean_difference']:+.3f}, {interval}, "
                f"better on {row['wins']} of {n}, Wilcoxon p = {_p(row['wilcoxon_p'])} "
                f"(Holm-adjusted {_p(row['holm_p'])}), rank-biserial r = "
                f"{_num(row['rank_biserial'], '+.2f')}, n = {n}")
    direction = "better" if row["mean_difference"] > 0 else "worse"
    if shows_difference(row):
        claim = f"{a} {verb} {direction} than {b}"
    elif n < 6:  # the smallest two-sided Wilcoxon p with 5 cases is 0.0625
        claim = (f"{a} scored {direction} than {b} on these cases, but {n} paired "
                 f"case{'s are' if n != 1 else ' is'} too few to show a difference")
    else:
        claim = f"no difference between {a} and {b} is shown"
    costs = [f"{ratio_text(row[f'{key}_ratio'])} the {name}" for key, name in COSTS.items()
             if not math.isnan(row.get(f"{key}_ratio", math.nan))]
    cost = f"; {a} takes {', '.join(costs)} of {b}" if costs else ""
    return f"{claim} ({evidence}){cost}."


def _budget_check(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the trained models saw as many samples (the stated, equal-by-default budget)."""
    seen = {r["model"]: r["samples_seen"] for r in table if not math.isnan(r["samples_seen"])}
    seconds = {r["model"]: r["training_s"] for r in table if not math.isnan(r["training_s"])}
    equal = not seen or max(seen.values()) <= UNEQUAL_BUDGET * min(seen.values())
    return {"samples_seen": seen, "training_seconds": seconds, "equal": equal,
            "note": "every model saw the same number of training samples" if equal and seen
            else "UNEQUAL budgets: " + ", ".join(f"{m} {v:,.0f}" for m, v in seen.items())
            + " samples; differences in score mix the models with their budgets"
            if seen else "no budget recorded"}


def _headlines(summary: dict[str, Any]) -> list[str]:
    """Who won, by how much, with what uncertainty, at what cost: one line per task."""
    lines = []
    for task, table, paired, verb in (
            ("Segmentation", summary["segmentation"], summary["paired"], "segments"),
            ("Registration", summary["registration"], summary["registration_paired"],
             "registers")):
        if not table or math.isnan(table[0]["mean_dice"][0]):
            continue
        winner = table[0]
        mean, sd = winner["mean_dice"]
        unit = "case" if task == "Segmentation" else "pair"
        n = winner["cases"]
        spread = f"SD {sd:.3f} over {n} {unit}s" if not math.isnan(sd) else f"one {unit}"
        line = f"{task}: {winner['model']} {verb} best, mean Dice {mean:.3f} ({spread})"
        if not math.isnan(winner["samples_seen"]):
            where = {"cpu": "a CPU"}.get(winner.get("device"), winner.get("device"))
            device = f" on {where}" if where else ""
            line += f" at a budget of {winner['samples_seen']:,.0f} training samples{device}"
        if len(table) > 1:
            runner = table[1]
            row = next((r for r in paired if r["a"] == winner["model"]
                        and r["b"] == runner["model"]), None)
            if row is not None:
                shown = "shown" if shows_difference(row) else "not shown"
                line += (f"; {row['mean_difference']:+.3f} over {runner['model']} "
                         f"(Holm-adjusted p = {_p(row['holm_p'])}: a difference is {shown})")
                ratio = row.get("training_s_ratio", math.nan)
                if not math.isnan(ratio):
                    line += f", at {ratio_text(ratio)} its training time"
        lines.append(line + ".")
    if summary["budgets"]["samples_seen"] and not summary["budgets"]["equal"]:
        lines.append(summary["budgets"]["note"] + ".")
    if summary["did_not_finish"]:
        named = sorted({f"{r['model']} fold {r['fold']}" for r in summary["did_not_finish"]})
        lines.append(f"Not compared: {', '.join(named)} did not finish (see \"Did not "
                     "finish\").")
    return lines


def _did_not_finish(runs: Sequence[TrackedRun],
                    unfinished: Sequence[UnfinishedRun]) -> list[dict[str, Any]]:
    """The unfinished trainings no finished run replaces, with what they reached and why."""
    finished = {(r.tags.get(tracked.TASK), r.tags.get(tracked.MODEL), r.tags.get(tracked.FOLD))
                for r in runs}
    return [asdict(u) for u in unfinished if (u.task, u.model, u.fold) not in finished]


def _describe(row: dict[str, Any], folds: Sequence[TrackedRun],
              results: Path | None) -> dict[str, str]:
    """What the method is: its network, parameters, recipe, budget and postprocessing;
    baselines named."""
    from medpipe.models import model_spec

    model = row["model"]
    base = model.removesuffix("_io")
    if model in BASELINES:
        return {"model": model, "text": BASELINES[model]}
    try:
        what = model_spec(base).description
    except MedpipeError:
        what = base
    if model != base:
        what += ", refined per pair by instance optimisation"
    params = folds[0].params if folds else {}
    parts = [what]
    if not math.isnan(row["parameters"]):
        parts.append(f"{row['parameters'] / 1e6:.2f} M parameters")
    optimizer = params.get("run.training.optimizer.name")
    if optimizer:
        augment = "with" if params.get("run.training.augment") == "true" else "without"
        parts.append(f"{optimizer} lr {params.get('run.training.optimizer.lr')} "
                     f"{params.get('run.training.optimizer.schedule')}, {augment} augmentation")
    if not math.isnan(row["samples_seen"]):
        unit = "patches" if folds[0].tags.get(tracked.TASK) == "segmentation" else "pairs"
        patch = params.get("run.patch_size")
        parts.append(f"budget {row['samples_seen']:,.0f} {unit}"
                     + (f" of {patch}" if patch and unit == "patches" else "")
                     + f" ({params.get('run.training.epochs')} epochs x "
                     f"{params.get('run.training.iterations_per_epoch')} steps x "
                     f"{params.get('run.batch_size')}), {row['training_s'] / 60:.1f} min")
    skipped = _metric(folds, tracked.SKIPPED_STEPS_TOTAL)
    if skipped > 0:  # NaN (an older run) and 0 say nothing
        parts.append(f"{skipped:.0f} steps skipped (a non-finite loss or gradient)")
    decision = results / "runs" / model / "postprocessing.json" if results else None
    if decision is not None and decision.is_file():
        parts.append(_postprocessing_line(decision))
    return {"model": model, "text": "; ".join(parts)}


def _postprocessing_line(path: Path) -> str:
    from medpipe.postprocessing import read_postprocessing

    decision = read_postprocessing(path)
    chosen = decision.chosen
    if not chosen:
        return (f"no postprocessing (keeping the largest component helped nothing on "
                f"{decision.cases} cross-validation cases)")
    return (f"postprocessing: largest component kept for {', '.join(chosen)} (it raised the "
            f"cross-validation Dice on {decision.cases} cases)")


def _examples(runs: Sequence[TrackedRun], out_dir: Path) -> list[dict[str, str]]:
    """One example figure per model (its lowest fold): validation overlays for segmentation,
    the first evaluated pair with its deformation grid and Jacobian for registration."""
    chosen: dict[tuple[str, str], str] = {}
    for run in sorted(runs, key=lambda r: int(r.tags.get(tracked.FOLD, 0))):
        key = (run.tags[tracked.TASK], run.tags[tracked.MODEL])
        source = run.files.get("example.png")
        if key in chosen or source is None:
            continue
        name = f"example_{key[0]}_{key[1]}.png"
        shutil.copyfile(source, out_dir / name)
        chosen[key] = name
    return [{"task": task, "model": model, "file": name}
            for (task, model), name in sorted(chosen.items())]


def _p(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def _num(value: float, spec: str = ".3f") -> str:
    return "-" if math.isnan(value) else format(value, spec)
