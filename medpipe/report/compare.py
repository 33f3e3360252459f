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
from medpipe.report.statistics import (
    MIN_CASES_FOR_INTERVAL,
    claims_difference,
    convergence,
    holm,
    paired_difference,
    run_level_difference,
)
from medpipe.tracking import TEST_CASES, TrackedRun, UnfinishedRun

UNEQUAL_BUDGET = 1.05  # samples seen differing by more than 5 % make a comparison unequal
# nnU-Net v2's default budget in steps: 1000 epochs x 250 iterations (x its batch size)
NNUNET_DEFAULT_STEPS = 1000 * 250

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
                 unfinished: Sequence[UnfinishedRun] = (),
                 dataset: Path | None = None) -> dict[str, Any]:
    """Tables, statistics and figures from RUNS (`tracking.finished_runs`) and, in the
    workflow's RESULTS folder, the test-set evaluations and postprocessing decisions; files
    in OUT_DIR. UNFINISHED runs (`tracking.unfinished_runs`) without a finished run of the
    same model and fold are listed as not compared, with the reason. DATASET (its
    dataset.json) describes the data in the scope box."""
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
    seg_run_file = _segmentation_run_file(seg_models)
    seg_runs = {m: _run_scores(folds, seg_run_file, ("case_id",))
                for m, folds in seg_models.items()}
    reg_runs = {m: _run_scores(folds, "pairs.csv", ("moving", "fixed"))
                for m, folds in reg_methods.items()}
    table = _table(seg_models, seg_scores, "segmentation", seg_runs)
    reg_table = _table(reg_methods, reg_scores, "registration", reg_runs)
    paired = _paired(seg_scores, table, seg_runs)
    reg_paired = _paired(reg_scores, reg_table, reg_runs)
    summary = {
        "segmentation_scope": seg_scope,
        "segmentation": table,
        # where each run's own scores (the run spread, the run pairs) come from: the test
        # set only where every run scored it, else the runs' validation cases
        "segmentation_runs_on": "test set" if seg_run_file == TEST_CASES
        else "validation cases",
        "paired": paired,
        "budgets": _budget_check(table),
        "registration_scope": reg_scope,
        "registration": reg_table,
        "registration_paired": reg_paired,
        "methods": [_describe(row, runs_of, results) for row, runs_of in
                    [*((r, seg_models[r["model"]]) for r in table),
                     *((r, reg_methods[r["model"]]) for r in reg_table)]],
        "figures": [],
        "examples": _examples(segmentation + registration, out_dir),
        "did_not_finish": _did_not_finish(runs, unfinished),
    }
    summary["headline"] = _headlines(summary)
    summary["scope"] = _scope(summary, runs, dataset)
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


def run_order(run: TrackedRun) -> tuple:
    """Runs by task, model, fold, then seed (as numbers), then id: one order whatever the
    source (a store lists runs newest first, an archive by id), as the seeded run-level
    bootstrap, the example figures and the study's record of runs depend on it."""
    seed = run.tags.get(tracked.SEED, "")
    return (run.tags.get(tracked.TASK, ""), run.tags.get(tracked.MODEL, ""),
            int(run.tags.get(tracked.FOLD, 0)),
            (int(seed), "") if seed.lstrip("-").isdigit() else (0, seed), run.run_id)


def headline_scores(summary: dict) -> dict[str, float]:
    """Each model's and method's mean Dice in the report, under the names the comparison's
    MLflow run logs them (`mean_dice_MODEL`, `registration_mean_dice_METHOD`)."""
    return {f"{prefix}mean_dice_{row['model']}": row["mean_dice"][0]
            for prefix, task in (("", "segmentation"), ("registration_", "registration"))
            for row in summary[task] if not math.isnan(row["mean_dice"][0])}


def _by_model(runs: Sequence[TrackedRun]) -> dict[str, list[TrackedRun]]:
    """Each model's runs by fold, then seed (`run_order`)."""
    out: dict[str, list[TrackedRun]] = defaultdict(list)
    for run in sorted(runs, key=run_order):
        out[run.tags[tracked.MODEL]].append(run)
    return dict(out)


def _pooled(folds: Sequence[TrackedRun], name: str, key_columns: Sequence[str],
            by_fold: bool = True) -> Scores:
    """Every fold's cases (keyed by fold and case): the cross-validation scores; a case that
    several runs of one fold scored (seeds) takes their mean. Not BY_FOLD: keyed by case
    alone, a case every run scored (the test set) takes the mean over all runs."""
    collected: dict[str, dict[tuple, dict[str, list[float]]]] = {"dice": {}, "hd95": {}}
    for run in folds:
        if name in run.files:
            prefix = (run.tags.get(tracked.FOLD),) if by_fold else ()
            scores = read_scores(run.files[name], key_columns, prefix)
            for metric, table in (("dice", scores.dice), ("hd95", scores.hd95)):
                for key, values in table.items():
                    for label, value in values.items():
                        collected[metric].setdefault(key, {}).setdefault(label, []).append(
                            value)
    pooled = Scores()
    for metric, target in (("dice", pooled.dice), ("hd95", pooled.hd95)):
        for key, values in collected[metric].items():
            target[key] = {label: float(np.mean(v)) for label, v in values.items()}
    return pooled


def _segmentation_run_file(models: dict[str, list[TrackedRun]]) -> str:
    """Which of each run's evaluations pairs runs on the same cases: its own test-set
    scores when every run of every model has them (repeated runs), else its validation
    cases' (folds differ in them; seeds of one fold share them)."""
    runs = [run for folds in models.values() for run in folds]
    return TEST_CASES if runs and all(TEST_CASES in r.files for r in runs) else "cases.csv"


def _segmentation_scores(models: dict[str, list[TrackedRun]], test_results: Path | None,
                         ) -> tuple[dict[str, Scores], str]:
    """The test set's scores when every model has them (each case's mean over a model's
    runs where every run scored the test set, else the fold ensemble's), else the
    cross-validation cases'."""
    if models and _segmentation_run_file(models) == TEST_CASES:
        scores = {m: _pooled(folds, TEST_CASES, ("case_id",), by_fold=False)
                  for m, folds in models.items()}
        n = len(next(iter(scores.values())).dice)
        runs = sorted({len(folds) for folds in models.values()})
        counts = str(runs[0]) if len(runs) == 1 else f"{runs[0]} to {runs[-1]}"
        return scores, f"test set, n = {n} cases, each case's mean over {counts} runs"
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


def _run_scores(runs: Sequence[TrackedRun], name: str,
                key_columns: Sequence[str]) -> list[dict[tuple, float]]:
    """One {case: mean Dice} per training run (a fold, or a seed) from its evaluation file:
    the level above the cases that repeated training adds."""
    return [scores for run in runs if name in run.files
            if (scores := read_scores(run.files[name], key_columns).mean_dice())]


def _convergence(runs: Sequence[TrackedRun]) -> dict[str, Any]:
    """The convergence check over a model's runs: still improving when any run is (the
    mean gain and the largest budget a fit asks for, over the runs)."""
    checks = [convergence(run.cost_curve(tracked.SAMPLES_SEEN)) for run in runs]
    known = [c for c in checks if c["still_improving"] is not None]
    if not known:
        return {"still_improving": None, "gain": math.nan, "budget_needed": math.nan}
    needed = [c["budget_needed"] for c in known if not math.isnan(c["budget_needed"])]
    return {"still_improving": any(c["still_improving"] for c in known),
            "gain": float(np.mean([c["gain"] for c in known])),
            "budget_needed": max(needed) if needed else math.nan}


def _table(models: dict[str, list[TrackedRun]], scores: dict[str, Scores],
           task: str, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per method, best mean Dice first: scores as (mean, sd over cases), the runs
    and the spread of their means, costs as the mean over runs, the convergence check."""
    rows = []
    for model, folds in models.items():
        score = scores.get(model, Scores())
        run_means = [float(np.mean(list(r.values()))) for r in runs.get(model, [])]
        row: dict[str, Any] = {"model": model, "folds": len(folds), "cases": len(score.dice),
                               "mean_dice": _spread(list(score.mean_dice().values())),
                               "runs": len(run_means), "run_spread": _spread(run_means)}
        row["convergence"] = _convergence(folds)  # unknown without validation curves
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


def _paired(scores: dict[str, Scores], table: list[dict[str, Any]],
            runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every pair of methods (better-scoring first) over the cases both were scored on, the
    p-values Holm-corrected across the pairs, with a's costs relative to b's; and over
    their training runs (`run_level`: what a claim rests on, its p Holm-corrected too;
    a baseline is not trained: its one run has no run-to-run spread)."""
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
        row["a_baseline"], row["b_baseline"] = a in BASELINES, b in BASELINES
        row["run_level"] = run_level_difference(runs.get(a, []), runs.get(b, []),
                                                a in BASELINES, b in BASELINES)
        for key in COSTS:
            top, bottom = by_model[a].get(key, math.nan), by_model[b].get(key, math.nan)
            row[f"{key}_ratio"] = top / bottom if bottom and not math.isnan(bottom) \
                else math.nan
        rows.append(row)
    for row, adjusted in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
        row["holm_p"] = adjusted
    run_p = holm([r["run_level"]["bootstrap_p"] for r in rows])
    improving = {r["model"] for r in table if r["convergence"]["still_improving"]}
    for row, adjusted in zip(rows, run_p, strict=True):
        row["run_level"]["holm_p"] = adjusted
        row["still_improving"] = sorted({row["a"], row["b"]} & improving)
        row["claimed"] = claims_difference(row["run_level"]) and not row["still_improving"]
    return rows


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
    """The verdicts, one line per question a reader brings: which segmentation model, which
    registration method, at what cost, how sure."""
    lines = []
    for task, table, paired, verb in (
            ("segmentation model", summary["segmentation"], summary["paired"], "segments"),
            ("registration method", summary["registration"], summary["registration_paired"],
             "registers")):
        if table and not math.isnan(table[0]["mean_dice"][0]):
            lines.append(f"Which {task}? " + _answer(table, paired, verb))
    cost = _cost_answer(summary)
    if cost:
        lines.append("At what cost? " + cost)
    lines.append("How sure? " + _sureness(summary))
    if summary["budgets"]["samples_seen"] and not summary["budgets"]["equal"]:
        lines.append(summary["budgets"]["note"] + ".")
    if summary["did_not_finish"]:
        named = sorted({f"{r['model']} fold {r['fold']}"
                        + (f" seed {r['seed']}" if r.get("seed") not in ("", "0", None) else "")
                        for r in summary["did_not_finish"]})
        lines.append(f"Not compared: {', '.join(named)} did not finish (see \"Did not "
                     "finish\").")
    return lines


def _answer(table: list[dict[str, Any]], paired: list[dict[str, Any]], verb: str) -> str:
    """Who is best and whether that is claimed: no winner among models still improving,
    none without repeated runs, else the run-level test against the runner-up."""
    best = table[0]
    mean = best["mean_dice"][0]
    improving = [r for r in table if r["convergence"]["still_improving"]]
    if improving:
        names = ", ".join(r["model"] for r in improving)
        gains = ", ".join(f"+{r['convergence']['gain']:.3f}" for r in improving)
        needed = [r["convergence"]["budget_needed"] for r in improving]
        known = [n for n in needed if not math.isnan(n)]
        estimate = (f"; a saturating fit to the curves asks for about {max(known):,.0f} "
                    "samples" if known else "; the curves do not say how many more samples "
                    "it would take")
        return (f"no winner is declared: {names} {'was' if len(improving) == 1 else 'were'} "
                f"still improving at the end of the budget (mean Dice gained over its last "
                f"quarter: {gains}){estimate}. Highest so far: {best['model']}, {mean:.3f}."
                + _claims_among_converged(paired))
    if len(table) == 1:
        return f"{best['model']} alone, mean Dice {mean:.3f}."
    runner = table[1]
    row = next((r for r in paired if r["a"] == best["model"] and r["b"] == runner["model"]),
               None)
    scores = f"mean Dice {mean:.3f} against {runner['model']}'s {runner['mean_dice'][0]:.3f}"
    if row is None:
        return f"{best['model']} scored highest ({scores}); they share no cases to compare."
    level = row["run_level"]
    if not level["runs_measured"]:
        return (f"{best['model']} scored highest ({scores}), but with one training run per "
                "model the run-to-run variance was not measured, so no ranking is claimed.")
    if level["too_few_cases"]:
        return (f"{best['model']} scored highest ({scores}), but {best['cases']} "
                f"case{'s are' if best['cases'] != 1 else ' is'} too few to show a "
                f"difference (an interval needs {MIN_CASES_FOR_INTERVAL}).")
    pairs = level["run_pairs"]
    evidence = (f"{pairs} run pair{'s' if pairs != 1 else ''}, hierarchical bootstrap 95% CI "
                f"[{level['ci_low']:+.3f}, {level['ci_high']:+.3f}], Holm-adjusted p = "
                f"{_p(level['holm_p'])}")
    if row["claimed"]:
        return (f"{best['model']} {verb} best: {scores}, {level['mean_difference']:+.3f} "
                f"(every run pair agrees; {evidence}).")
    reason = ("the run pairs disagree in sign" if not level["signs_agree"]
              else "the interval includes zero")
    return (f"{best['model']} scored highest ({scores}), but a difference is not shown: "
            f"{reason} ({evidence}).")


def _claims_among_converged(paired: list[dict[str, Any]]) -> str:
    """The differences that are claimed while a winner is withheld: between models that had
    stopped improving (a claim never involves one still improving), grouped by the better."""
    above: dict[str, list[str]] = {}
    for row in paired:
        if row["claimed"]:
            above.setdefault(row["a"], []).append(
                f"{row['b']} ({row['run_level']['mean_difference']:+.3f})")
    if not above:
        return ""
    shown = "; ".join(f"{a} above " + (", ".join(bs[:-1]) + " and " if len(bs) > 1 else "")
                      + bs[-1] for a, bs in above.items())
    return f" Shown among the models that had stopped improving: {shown}."


def _cost_answer(summary: dict[str, Any]) -> str:
    """Training and inference time of the best segmentation model against the runner-up's;
    seconds per pair of the best network against the best baseline's."""
    parts = []
    table = summary["segmentation"]
    if len(table) > 1:
        best, runner = table[0], table[1]
        ratios = [f"{ratio_text(best[k] / runner[k])} the {name}"
                  for k, name in (("training_s", "training time"),
                                  ("inference_s_per_case", "inference time"))
                  if not math.isnan(best[k]) and not math.isnan(runner[k]) and runner[k]]
        if ratios:
            parts.append(f"{best['model']} takes {', '.join(ratios)} of {runner['model']}")
    reg = summary["registration"]
    networks = [r for r in reg if r["model"] not in BASELINES]
    baselines = [r for r in reg if r["model"] in BASELINES and r["model"] != "identity"]
    if networks and baselines:
        net, base = networks[0], baselines[0]
        seconds = net["inference_s_per_case"], base["inference_s_per_case"]
        if not any(math.isnan(v) for v in seconds) and seconds[0] > 0:
            parts.append(f"the best network ({net['model']}, {net['mean_dice'][0]:.3f}) "
                         f"registers a pair in {seconds[0]:.2g} s, the best baseline "
                         f"({base['model']}, {base['mean_dice'][0]:.3f}) in {seconds[1]:.2g} s "
                         f"({ratio_text(seconds[1] / seconds[0])} as long)")
    return "; ".join(parts) + "." if parts else ""


CLAIM_RULE = ("A difference is claimed only where every pair of runs agrees in sign and a "
              "hierarchical bootstrap (runs, then cases) excludes zero after Holm's "
              "correction, and not among models still improving.")


def _sureness(summary: dict[str, Any]) -> str:
    runs = _run_counts(summary)
    counted = (f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}") if runs else "no"
    text = f"{counted} training run{'s' if runs != [1] else ''} per model. {CLAIM_RULE}"
    if runs and runs[0] < 2:
        text += (" With one run, run-to-run variance is not measured: the Wilcoxon p-values "
                 "in the tables cover the cases of one trained network per model, not "
                 "retraining.")
    unchecked = sorted({r["model"] for r in summary["segmentation"] + summary["registration"]
                        if r["model"] not in BASELINES
                        and r["convergence"]["still_improving"] is None})
    if unchecked:
        text += (f" Whether {', '.join(unchecked)} had stopped improving is not known: "
                 "no validation before the last quarter of the budget to compare the last "
                 "one with (validate more often: `training.val_every`).")
    return text


def _run_counts(summary: dict[str, Any]) -> list[int]:
    """The distinct numbers of training runs of the trained (non-baseline) methods."""
    return sorted({r["runs"] for r in summary["segmentation"] + summary["registration"]
                   if r["model"] not in BASELINES})


def _scope(summary: dict[str, Any], runs: Sequence[TrackedRun],
           dataset: Path | None) -> list[str]:
    """What the numbers are about: the data, the runs, the budget against nnU-Net's
    default, the recipe, and what the p-values cover."""
    import json

    from medpipe.data.demo import DEMO_NAME

    name = next((r.params.get("run.dataset_name") for r in runs
                 if r.params.get("run.dataset_name")), None)
    description = None
    if dataset is not None and (dataset / "dataset.json").is_file():
        spec = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
        name, description = spec.get("name", name), spec.get("description")
    data = f"Data: {name or 'the dataset'}"
    if name == DEMO_NAME:
        data += (" (synthetic: one template, MNI152, through random smooth deformations; "
                 "its cases are draws from one generator, not different subjects)")
    elif description:
        data += f" ({description.rstrip('.')})"
    lines = [data + f"; segmentation scored on {summary['segmentation_scope']}"
             + (f", registration on {summary['registration_scope']}"
                if summary["registration"] else "") + "."]
    trained = [r for r in summary["segmentation"] + summary["registration"]
               if r["model"] not in BASELINES]
    if trained:
        lines.append("Runs: " + ", ".join(f"{r['model']} {r['runs']}" for r in trained)
                     + " (a run: one training of one fold or seed).")
    shares = []
    for row in summary["segmentation"]:
        folds = [r for r in runs if r.tags.get(tracked.MODEL) == row["model"]
                 and r.tags.get(tracked.TASK) == "segmentation"]
        batch = next((float(r.params["run.batch_size"]) for r in folds
                      if "run.batch_size" in r.params), math.nan)
        if not math.isnan(row["samples_seen"]) and not math.isnan(batch):
            share = 100 * row["samples_seen"] / (NNUNET_DEFAULT_STEPS * batch)
            shares.append(f"{row['model']} {row['samples_seen']:,.0f} ({share:.2g} %)")
    if shares:
        lines.append("Budget, samples seen per run (share of nnU-Net's default, 1000 epochs "
                     "x 250 steps at the same batch): " + ", ".join(shares) + ".")
    recipes = sorted({r.tags.get(tracked.RECIPE, "shared") for r in runs
                      if r.tags.get(tracked.MODEL) not in BASELINES})
    lines.append("Recipe: " + {
        ("shared",): "shared (one optimiser, schedule and augmentation setting for every "
                     "model, as configured)",
        ("native",): "native (each model as its authors train it)"}.get(
        tuple(recipes), " and ".join(recipes) or "none") + "; each method's is named under "
        "\"What was compared\".")
    machines = _machines(runs)
    if len(machines) > 1:
        lines.append("Machines: the trainings' costs come from " + "; ".join(
            f"{host} ({', '.join(models)})" for host, models in machines.items())
            + ". Compare training times only within one machine.")
    lines.append("p-values: those of the hierarchical bootstrap cover runs and cases, "
                 "Holm-corrected within a table; the Wilcoxon p in the tables covers the cases "
                 "of one trained network per model.")
    return lines


def _machines(runs: Sequence[TrackedRun]) -> dict[str, list[str]]:
    """Each machine (`tracked.HOST`) the trained runs' costs come from, with its models; a
    run without the tag (older than it) counts as "not recorded"."""
    found: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        if run.tags.get(tracked.MODEL) not in BASELINES and tracked.MODEL in run.tags:
            found[run.tags.get(tracked.HOST, "machine not recorded")].add(run.tags[tracked.MODEL])
    return {host: sorted(models) for host, models in sorted(found.items())}


def _did_not_finish(runs: Sequence[TrackedRun],
                    unfinished: Sequence[UnfinishedRun]) -> list[dict[str, Any]]:
    """The unfinished trainings no finished run replaces, with what they reached and why."""
    finished = {(r.tags.get(tracked.TASK), r.tags.get(tracked.MODEL), r.tags.get(tracked.FOLD),
                 r.tags.get(tracked.SEED, "")) for r in runs}
    return [asdict(u) for u in unfinished
            if (u.task, u.model, u.fold, u.seed) not in finished]


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
    parts = [what, _recipe_text(base, folds)]
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


def _recipe_text(model: str, runs: Sequence[TrackedRun]) -> str:
    """The recipe MODEL's runs trained with: `native` (whose, from the model's spec) or
    `shared` (the config's settings for every model; also runs from before the setting)."""
    from medpipe.models import MODELS

    recipes = sorted({r.tags.get(tracked.RECIPE, "shared") for r in runs})
    spec = MODELS.get(model)
    if recipes == ["native"] and spec is not None:
        return f"recipe: native ({spec.recipe_source or 'its own optimiser defaults'})"
    return f"recipe: {' and '.join(recipes)}" + (
        " (the config's training settings, one for every model)" if recipes == ["shared"]
        else "")


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
    for run in sorted(runs, key=run_order):
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
