"""`medpipe compare`: one report across every model, built from the MLflow runs alone.

Segmentation: per model, Dice per class (mean +- std over folds), HD95, and the costs
(training time, inference seconds per case, parameters, peak memory). Is the transformer
worth it? For each pair of models, the paired difference in per-case mean Dice on the same
validation cases: mean, a bootstrap 95% interval (10,000 resamples, seeded) and the
Wilcoxon signed-rank p-value (scipy), next to what each costs. Registration: identity, the
classical baselines (SimpleITK, ANTs SyN) and each network on the same held-out pairs.
Written as `report.md` and a self-contained `report.html` (figures inlined), and logged to a
parent MLflow run under which the compared runs are nested.
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from medpipe import tracked
from medpipe.errors import MedpipeError
from medpipe.figures import save_figure
from medpipe.io import atomic_output, write_json
from medpipe.tracking import TrackedRun

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
SIGNIFICANCE = 0.05  # a verdict needs the bootstrap interval off zero and Wilcoxon p below it


def build_report(runs: Sequence[TrackedRun], out_dir: Path) -> dict[str, Any]:
    """Tables, statistics and figures from RUNS (`tracking.finished_runs`); files in OUT_DIR."""
    segmentation = [r for r in runs if r.tags.get(tracked.TASK) == "segmentation"]
    registration = [r for r in runs if r.tags.get(tracked.TASK) == "registration"]
    if not segmentation and not registration:
        raise MedpipeError("no finished segmentation or registration runs to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = _per_case_dice(segmentation)
    table = _segmentation_table(segmentation)
    paired = _with_costs(_paired_statistics(cases), table)
    summary = {
        "segmentation": table,
        "paired": paired,
        "verdicts": [_verdict(row) for row in paired],
        "registration": _registration_table(registration),
        "figures": [],
        "examples": _examples(segmentation + registration, out_dir),
    }
    if cases:
        summary["figures"].append(_dice_boxplot(cases, out_dir / "dice_per_case.png"))
    curves = [r for r in segmentation + registration if r.val_dice_history]
    if curves:
        summary["figures"].append(_learning_curves(curves, out_dir / "learning_curves.png"))
    write_json(summary, out_dir / "summary.json")
    _write(out_dir / "report.md", _markdown(summary))
    _write(out_dir / "report.html", _html(summary, out_dir))
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


# --------------------------------------------------------------------------- tables


def _metric_mean(runs: Sequence[TrackedRun], name: str) -> tuple[float, float]:
    values = [r.metrics[name] for r in runs if name in r.metrics]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))


def _segmentation_table(runs: Sequence[TrackedRun]) -> list[dict[str, Any]]:
    by_model: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_model[run.tags[tracked.MODEL]].append(run)
    rows = []
    for model, folds in sorted(by_model.items()):
        classes = sorted({name for r in folds for k in r.metrics
                          if (name := tracked.class_of_eval_metric(k, "dice")) is not None})
        row = {"model": model, "folds": len(folds)}
        for name in classes:
            row[f"dice_{name}"] = _metric_mean(folds, tracked.eval_class_metric("dice", name))
        for key, metric in (("mean_dice", tracked.EVAL_MEAN_DICE),
                            ("hd95_mm", tracked.EVAL_MEAN_HD95),
                            ("training_s", tracked.TRAINING_SECONDS),
                            ("inference_s_per_case", tracked.EVAL_SECONDS_PER_CASE),
                            ("parameters", tracked.PARAMETERS),
                            ("peak_memory_mb", tracked.PEAK_MEMORY_MB)):
            row[key] = _metric_mean(folds, metric)
        rows.append(row)
    return rows


def _registration_table(runs: Sequence[TrackedRun]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if tracked.EVAL_MEAN_DICE in run.metrics:
            by_method[run.tags[tracked.MODEL]].append(run)
    order = {"identity": 0, "classical": 1, "ants": 2}
    rows = []
    for method, folds in sorted(by_method.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
        row = {"method": method, "folds": len(folds)}
        for key, metric in (("mean_dice", tracked.EVAL_MEAN_DICE),
                            ("hd95_mm", tracked.EVAL_MEAN_HD95),
                            ("folding_percent", tracked.EVAL_FOLDING_PERCENT),
                            ("sdlogj", tracked.EVAL_SDLOGJ),
                            ("inverse_consistency_mm",
                             tracked.eval_metric("inverse_consistency_mm")),
                            ("dice30_learn2reg", tracked.EVAL_DICE30),
                            ("hd95_voxels_learn2reg", tracked.EVAL_MEAN_HD95_VOXELS),
                            ("sdlogj_learn2reg", tracked.EVAL_SDLOGJ_LEARN2REG),
                            ("seconds_per_pair", tracked.EVAL_SECONDS_PER_PAIR)):
            row[key] = _metric_mean(folds, metric)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- statistics


def _per_case_dice(runs: Sequence[TrackedRun]) -> dict[str, dict[tuple, float]]:
    """model -> {(fold, case): mean Dice over classes} from each run's cases.csv."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for run in runs:
        path = run.files.get("cases.csv")
        if path is None:
            continue
        per_case: dict[str, list[float]] = defaultdict(list)
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                value = float(row["dice"])
                if not math.isnan(value):
                    per_case[row["case_id"]].append(value)
        fold = run.tags.get(tracked.FOLD, "0")
        for case_id, values in per_case.items():
            out[run.tags[tracked.MODEL]][(fold, case_id)] = float(np.mean(values))
    return dict(out)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a - b over paired cases, its bootstrap 95% interval (percentile, resampling
    cases) and the two-sided Wilcoxon signed-rank p-value (NaN when all differences are 0)."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP_SAMPLES, len(diff)))].mean(axis=1)
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else math.nan
    return {"n": len(diff), "mean_difference": float(diff.mean()),
            "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5)), "wilcoxon_p": p}


def _paired_statistics(cases: dict[str, dict[tuple, float]]) -> list[dict[str, Any]]:
    rows = []
    for first, second in itertools.combinations(sorted(cases), 2):
        shared = sorted(set(cases[first]) & set(cases[second]))
        if not shared:
            continue
        stats = paired_difference([cases[first][k] for k in shared],
                                  [cases[second][k] for k in shared])
        rows.append({"a": first, "b": second, **stats})
    return rows


COSTS = {"parameters": "parameters", "training_s": "training time",
         "inference_s_per_case": "inference time", "peak_memory_mb": "peak memory"}


def _with_costs(paired: list[dict[str, Any]], table: list[dict[str, Any]],
                ) -> list[dict[str, Any]]:
    """Each paired comparison with what model a costs relative to model b (ratios a / b)."""
    by_model = {row["model"]: row for row in table}
    out = []
    for row in paired:
        a, b = by_model.get(row["a"], {}), by_model.get(row["b"], {})
        ratios = {}
        for key in COSTS:
            top, bottom = a.get(key, (math.nan,))[0], b.get(key, (math.nan,))[0]
            ratios[f"{key}_ratio"] = top / bottom if bottom and not math.isnan(bottom) \
                else math.nan
        out.append({**row, **ratios})
    return out


def _verdict(row: dict[str, Any]) -> str:
    """The paired comparison in one sentence: is a better than b, and at what cost? "Better"
    needs both the bootstrap interval to exclude zero and the Wilcoxon test to reject at 5%:
    with a handful of cases a bootstrap interval is narrow by chance (with 3 cases the
    smallest possible two-sided Wilcoxon p is 0.25)."""
    a, b = row["a"], row["b"]
    evidence = (f"mean Dice difference {row['mean_difference']:+.3f}, 95% CI "
                f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], Wilcoxon p = "
                f"{_fmt(row['wilcoxon_p'])}, n = {row['n']} cases")
    p = row["wilcoxon_p"]
    excludes_zero = row["ci_low"] > 0 or row["ci_high"] < 0
    direction = "better" if row["mean_difference"] > 0 else "worse"
    if excludes_zero and p < SIGNIFICANCE:  # NaN compares False
        claim = f"{a} segments {direction} than {b}"
    elif excludes_zero:  # consistent on these cases, too few of them for the rank test
        cases = f"{row['n']} paired case" + ("s are" if row["n"] != 1 else " is")
        claim = (f"{a} scored {direction} than {b} on these cases, but {cases} too few to "
                 "show a difference")
    else:
        claim = f"no difference between {a} and {b} is shown"
    costs = [f"{row[f'{key}_ratio']:.2g}x the {name}" for key, name in COSTS.items()
             if not math.isnan(row.get(f"{key}_ratio", math.nan))]
    cost = f"; {a} takes {', '.join(costs)} of {b}" if costs else ""
    return f"{claim} ({evidence}){cost}."


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


# --------------------------------------------------------------------------- figures


def _dice_boxplot(cases: dict[str, dict[tuple, float]], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    models = sorted(cases)
    ax.boxplot([list(cases[m].values()) for m in models], tick_labels=models)
    ax.set_ylabel("per-case mean Dice")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return save_figure(fig, path).name


def _learning_curves(runs: Sequence[TrackedRun], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in runs:
        steps, values = zip(*run.val_dice_history, strict=True)
        tags = run.tags
        ax.plot(steps, values, "o-", label=f"{tags[tracked.MODEL]} fold {tags.get(tracked.FOLD)}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path).name


# --------------------------------------------------------------------------- writing


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return "-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}" if abs(mean) < 10 \
            else f"{mean:,.0f} ± {std:,.0f}"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1e-2 \
            else f"{value:.3f}"
    return str(value)


def _tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    for title, rows in (("Segmentation", summary["segmentation"]),
                        ("Paired comparison: mean Dice difference a - b (same cases)",
                         summary["paired"]),
                        ("Registration", summary["registration"])):
        if rows:
            header = list(rows[0])
            tables.append((title, header, [[_fmt(r.get(h)) for h in header] for r in rows]))
    return tables


def _markdown(summary: dict) -> str:
    lines = ["# medpipe comparison", ""]
    for title, header, rows in _tables(summary):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    if summary["verdicts"]:
        lines += ["## Is the bigger model worth it?", ""]
        lines += [f"- {verdict}" for verdict in summary["verdicts"]] + [""]
    lines += [f"![{name}]({name})" for name in summary["figures"]]
    if summary["examples"]:
        lines += ["", "## Examples", ""]
        lines += [f"### {e['task']}: {e['model']}\n\n![{e['model']}]({e['file']})\n"
                  for e in summary["examples"]]
    return "\n".join(lines) + "\n"


def _html(summary: dict, folder: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>medpipe comparison"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             "</style></head><body><h1>medpipe comparison</h1>"]
    for title, header, rows in _tables(summary):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    if summary["verdicts"]:
        parts.append("<h2>Is the bigger model worth it?</h2><ul>")
        parts += [f"<li>{html.escape(v)}</li>" for v in summary["verdicts"]]
        parts.append("</ul>")
    figures = [(name, name) for name in summary["figures"]] + [
        (f"Example, {e['task']}: {e['model']}", e["file"]) for e in summary["examples"]]
    for title, name in figures:
        data = base64.b64encode((folder / name).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img style='max-width:100%' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "".join(parts)


def _write(path: Path, text: str) -> None:
    with atomic_output(path) as staging:
        staging.write_text(text, encoding="utf-8")
