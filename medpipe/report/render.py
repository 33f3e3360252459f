"""The comparison summary as people read it: `report.md` and a self-contained `report.html`
(figures inlined), with readable column names and units, the winner marked, the spread over
cases and over runs beside every mean, and each method said in words.

The first screen answers: the scope (what the data is, runs, budget, recipe, what the
p-values cover), one verdict per question, and the two figures (Dice against training cost,
registration's accuracy against speed). Below, the tables and only the comparisons a reader
asks about (each model against the best; each network against each baseline); every other
pair, the methods' descriptions and the examples are folded away (`<details>`)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from medpipe.io import atomic_output

WINNER = "★"

# summary key -> (column heading, how to show it); class Dice columns are added per class
COLUMNS = {
    "segmentation": [
        ("mean_dice", "Mean Dice (± SD over cases)", "spread"),
        ("runs", "Runs", "count"),
        ("run_spread", "Mean Dice of runs (± SD over runs)", "spread"),
        ("convergence", "Still improving?", "improving"),
        ("hd95_mm", "HD95, mm (± SD)", "spread"),
        ("samples_seen", "Budget, samples", "count"),
        ("training_s", "Training, min", "minutes"),
        ("parameters", "Parameters, M", "millions"),
        ("inference_s_per_case", "Inference, s/case", "number"),
        ("peak_memory_mb", "Peak memory, GB", "gigabytes"),
    ],
    "registration": [
        ("mean_dice", "Mean Dice of warped labels (± SD over pairs)", "spread"),
        ("runs", "Runs", "count"),
        ("run_spread", "Mean Dice of runs (± SD over runs)", "spread"),
        ("convergence", "Still improving?", "improving"),
        ("hd95_mm", "HD95, mm (± SD)", "spread"),
        ("folding_percent", "Folding, % voxels", "number"),
        ("sdlogj", "SD log|J|", "number"),
        ("inference_s_per_case", "Seconds per pair", "number"),
        ("samples_seen", "Budget, pairs", "count"),
        ("training_s", "Training, min", "minutes"),
        ("dice30_learn2reg", "DSC30 (Learn2Reg)", "number"),
        ("sdlogj_learn2reg", "SDlogJ (Learn2Reg)", "number"),
    ],
}

PAIRED = [("pair", "a vs b"), ("n", "n"), ("mean_difference", "Mean Dice difference a - b"),
          ("runs", "Runs a x b"), ("signs", "Run pairs with a better"),
          ("run_interval", "95% CI (runs, then cases)"), ("run_holm_p", "Holm p (runs)"),
          ("claimed", "Difference claimed"), ("wins", "Cases with a better"),
          ("wilcoxon_p", "Wilcoxon p (cases, one network)"), ("rank_biserial", "Rank-biserial r"),
          ("training_s_ratio", "Training time a / b")]
FIGURES_FIRST = ("dice_versus_cost.png", "dice_versus_speed.png")


def ratio_text(value: float) -> str:
    """A cost ratio as people say it: 0.42x, 4.4x, 210x (never 2.1e+02x)."""
    return f"{value:.2g}x" if value < 10 else f"{value:,.0f}x"


def _show(value: Any, how: str) -> str:
    if how == "improving":
        improving = (value or {}).get("still_improving")
        if improving is None:
            return "-"
        return f"yes (+{value['gain']:.3f})" if improving else "no"
    if isinstance(value, tuple | list):
        mean, sd = value
        if math.isnan(mean):
            return "-"
        return f"{mean:.3f} ± {sd:.3f}" if not math.isnan(sd) else f"{mean:.3f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if how == "count":
        return f"{value:,.0f}"
    if how == "minutes":
        return f"{value / 60:.1f}"
    if how == "millions":
        return f"{value / 1e6:.2f}"
    if how == "gigabytes":
        return f"{value / 1024:.2f}"
    if isinstance(value, float):
        return f"{value:.2g}" if abs(value) < 0.01 and value else f"{value:.3f}" \
            if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _score_table(rows: list[dict[str, Any]], task: str, runs_on: str | None = None,
                 ) -> tuple[list[str], list[list[str]]]:
    """RUNS_ON: where the runs' own scores come from, named in their column when it is not
    the table's scope (the test set scored by the fold ensemble, the runs on their
    validation cases)."""
    classes = [k for k in (rows[0] if rows else {}) if k.startswith("dice_")]
    columns = COLUMNS[task][:1] + [(k, f"Dice {k.removeprefix('dice_').replace('_', ' ')}",
                                    "spread") for k in classes] + COLUMNS[task][1:]
    if runs_on:
        columns = [(key, f"Mean Dice of runs on their {runs_on} (± SD over runs)", how)
                   if key == "run_spread" else (key, title, how)
                   for key, title, how in columns]
    columns = [c for c in columns if any(_show(r.get(c[0]), c[2]) != "-" for r in rows)]
    # the star marks the highest mean, a winner only where the verdicts claim one
    header = [f"Method ({WINNER}: highest mean)"] + [title for _, title, _ in columns]
    body = [[(f"{WINNER} " if row.get("winner") else "") + row["model"]]
            + [_show(row.get(key), how) for key, _, how in columns] for row in rows]
    return header, body


def _paired_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    body = []
    for row in rows:
        level = row["run_level"]
        interval = "-" if math.isnan(level["ci_low"]) else \
            f"[{level['ci_low']:+.3f}, {level['ci_high']:+.3f}]"
        better = sum(d > 0 for d in level["run_pair_differences"])
        claim = ("yes" if row["claimed"] else
                 "no: still improving" if row["still_improving"] else
                 "no: one run" if not level["runs_measured"] else
                 "no: too few cases" if level["too_few_cases"] else "no")
        values = {"pair": f"{row['a']} vs {row['b']}", "n": str(row["n"]),
                  "mean_difference": f"{row['mean_difference']:+.3f}",
                  "runs": f"{level['runs_a']} x {level['runs_b']}",
                  "signs": f"{better} of {level['run_pairs']}", "run_interval": interval,
                  "run_holm_p": _show(level.get("holm_p", math.nan), "number"),
                  "claimed": claim, "wins": f"{row['wins']} of {row['n']}",
                  "wilcoxon_p": _show(row["wilcoxon_p"], "number"),
                  "rank_biserial": _show(row["rank_biserial"], "number"),
                  "training_s_ratio": "-" if math.isnan(row.get("training_s_ratio", math.nan))
                  else ratio_text(row["training_s_ratio"])}
        body.append([values[key] for key, _ in PAIRED])
    return [title for _, title in PAIRED], body


def sections(summary: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(heading, kind, content) in reading order; kind: scope, verdicts, figures (first
    screen), text, list, table, figure, and details (a heading folded over its own
    sections)."""
    out: list[tuple[str, str, Any]] = [("Scope", "scope", summary.get("scope", [])),
                                       ("Verdicts", "verdicts", summary["headline"])]
    figures = {f["file"]: f for f in summary["figures"]}
    first = [figures[name] for name in FIGURES_FIRST if name in figures]
    if first:
        out.append(("Figures", "figures", [(f["title"], f["file"]) for f in first]))
    if summary["segmentation"]:
        scope = summary["segmentation_scope"]
        runs_on = summary.get("segmentation_runs_on", "test set")
        out.append((f"Segmentation ({scope})", "table", _score_table(
            summary["segmentation"], "segmentation",
            runs_on if scope.startswith("test set") and runs_on != "test set" else None)))
        best = summary["segmentation"][0]["model"]
        against = [r for r in summary["paired"] if best in (r["a"], r["b"])]
        if against:
            out.append((f"Each model against the best ({best})", "table",
                        _paired_table(against)))
    if summary["registration"]:
        out.append((f"Registration ({summary['registration_scope']})", "table",
                    _score_table(summary["registration"], "registration")))
        asked = [r for r in summary["registration_paired"]
                 if r["a_baseline"] != r["b_baseline"]]
        if asked:
            out.append(("Each network against each baseline", "table", _paired_table(asked)))
    if summary["did_not_finish"]:
        out.append(("Did not finish", "list", [
            f"{r['model']} fold {r['fold']} ({r['task']}): {r['status']} after {r['epochs']} "
            f"epochs" + (f": {r['reason']}" if r["reason"] else "")
            for r in summary["did_not_finish"]]))
    folded: list[tuple[str, str, Any]] = []
    if summary["paired"]:
        folded.append(("Segmentation, every pair over the same cases", "table",
                       _paired_table(summary["paired"])))
    if summary["registration_paired"]:
        folded.append(("Registration, every pair over the same pairs", "table",
                       _paired_table(summary["registration_paired"])))
    folded.append(("What was compared", "list",
                   [f"{m['model']}: {m['text']}." for m in summary["methods"]]))
    budgets = summary["budgets"]
    if budgets["samples_seen"]:
        folded.append(("Budgets", "text", budgets["note"] + "."))
    folded.append(("How to read this", "text",
                   "Means are over cases with their standard deviation over cases; a run is "
                   "one training (a fold or a seed), and the spread of the runs' means is "
                   "shown beside. A difference is claimed only where every pair of runs (one "
                   "of each model) agrees in sign and the hierarchical bootstrap (runs "
                   "resampled, then cases), its p corrected by Holm's method across the "
                   "pairs of a table, excludes zero, and neither model was still improving "
                   "(more than +0.01 mean Dice over the last quarter of its budget). The "
                   "Wilcoxon signed-rank p covers the cases of one trained network per "
                   "model; rank-biserial r: +1 when a is better on every case."))
    for figure in summary["figures"]:
        if figure["file"] not in FIGURES_FIRST:
            folded.append((figure["title"], "figure", figure["file"]))
    for example in summary["examples"]:
        folded.append((f"Example, {example['task']}: {example['model']}", "figure",
                       example["file"]))
    out.append(("Details: every pair, the methods, budgets, figures per case, examples",
                "details", folded))
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# medpipe comparison", ""]
    for heading, kind, content in sections(summary):
        lines += _markdown_section(heading, kind, content, "##")
    return "\n".join(lines)


def _markdown_section(heading: str, kind: str, content: Any, level: str) -> list[str]:
    if kind == "details":  # GitHub renders Markdown inside <details> after a blank line
        lines = ["<details>", f"<summary>{html.escape(heading)}</summary>", ""]
        for inner in content:
            lines += _markdown_section(*inner, level + "#")
        return [*lines, "</details>", ""]
    lines = [f"{level} {heading}", ""]
    if kind == "text":
        lines.append(content)
    elif kind in ("list", "scope", "verdicts"):
        lines += [f"- {item}" for item in content]
    elif kind == "table":
        header, rows = content
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    elif kind == "figures":
        lines += [f"![{title}]({file})" for title, file in content]
    else:
        lines.append(f"![{heading}]({content})")
    return [*lines, ""]


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 1em;"
         "color:#222;font-size:15px}h1{font-size:1.5em;margin:.4em 0}"
         "h2{font-size:1.15em;margin:.8em 0 .3em}"
         "table{border-collapse:collapse;margin:.5em 0;display:block;overflow-x:auto;"
         "max-width:100%}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "th{background:#f2f2f2}tr.winner td{background:#eef7ee;font-weight:600}"
         "section.scope{background:#f7f7f2;border-left:4px solid #998;padding:.1em 1em;"
         "font-size:.88em}section.scope ul,section.headline ul{margin:.3em 0;padding-left:1.2em}"
         "section.headline{background:#f5f8ff;border-left:4px solid #36c;padding:.1em 1em}"
         "div.figures{display:flex;gap:1em}div.figures figure{flex:1;margin:0}"
         "div.figures img{max-height:400px;object-fit:contain}"
         "figcaption{font-size:.85em;color:#555}details{margin:1em 0}"
         "summary{cursor:pointer;font-weight:600}img{max-width:100%}")


def _image(folder: Path, file: str, alt: str) -> str:
    data = base64.b64encode((folder / file).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _html_section(heading: str, kind: str, content: Any, folder: Path) -> str:
    if kind == "details":
        inner = "".join(_html_section(*section, folder) for section in content)
        return f"<details><summary>{html.escape(heading)}</summary>{inner}</details>"
    css = {"scope": " class='scope'", "verdicts": " class='headline'"}.get(kind, "")
    parts = [f"<section{css}><h2>{html.escape(heading)}</h2>"]
    if kind == "text":
        parts.append(f"<p>{html.escape(content)}</p>")
    elif kind in ("list", "scope", "verdicts"):
        parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in content)
                     + "</ul>")
    elif kind == "table":
        header, rows = content
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                     + "</tr>")
        for row in rows:
            marked = " class='winner'" if row[0].startswith(WINNER) else ""
            parts.append(f"<tr{marked}>" + "".join(f"<td>{html.escape(c)}</td>"
                                                   for c in row) + "</tr>")
        parts.append("</table>")
    elif kind == "figures":
        parts.append("<div class='figures'>" + "".join(
            f"<figure>{_image(folder, file, title)}<figcaption>{html.escape(title)}"
            "</figcaption></figure>" for title, file in content) + "</div>")
    else:
        parts.append(_image(folder, content, heading))
    parts.append("</section>")
    return "".join(parts)


def page(summary: dict[str, Any], folder: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>medpipe comparison"
             f"</title><style>{STYLE}</style></head><body><h1>medpipe comparison</h1>"]
    parts += [_html_section(*section, folder) for section in sections(summary)]
    parts.append("</body></html>")
    return "".join(parts)


def write_reports(summary: dict[str, Any], folder: Path) -> None:
    for name, text in (("report.md", markdown(summary)), ("report.html", page(summary, folder))):
        with atomic_output(folder / name) as staging:
            staging.write_text(text, encoding="utf-8")
