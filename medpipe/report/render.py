"""The comparison summary as people read it: `report.md` and a self-contained `report.html`
(figures inlined), with readable column names and units, the winner marked, the spread over
cases beside every mean, and each method said in words."""

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
        ("hd95_mm", "HD95, mm (± SD)", "spread"),
        ("samples_seen", "Budget, samples", "count"),
        ("training_s", "Training, min", "minutes"),
        ("parameters", "Parameters, M", "millions"),
        ("inference_s_per_case", "Inference, s/case", "number"),
        ("peak_memory_mb", "Peak memory, GB", "gigabytes"),
    ],
    "registration": [
        ("mean_dice", "Mean Dice of warped labels (± SD over pairs)", "spread"),
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
          ("interval", "95% CI"), ("wins", "a better on"), ("wilcoxon_p", "Wilcoxon p"),
          ("holm_p", "Holm-adjusted p"), ("rank_biserial", "Rank-biserial r"),
          ("training_s_ratio", "Training time a / b")]


def ratio_text(value: float) -> str:
    """A cost ratio as people say it: 0.42x, 4.4x, 210x (never 2.1e+02x)."""
    return f"{value:.2g}x" if value < 10 else f"{value:,.0f}x"


def _show(value: Any, how: str) -> str:
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


def _score_table(rows: list[dict[str, Any]], task: str) -> tuple[list[str], list[list[str]]]:
    classes = [k for k in (rows[0] if rows else {}) if k.startswith("dice_")]
    columns = COLUMNS[task][:1] + [(k, f"Dice {k.removeprefix('dice_').replace('_', ' ')}",
                                    "spread") for k in classes] + COLUMNS[task][1:]
    columns = [c for c in columns if any(_show(r.get(c[0]), c[2]) != "-" for r in rows)]
    header = ["Method"] + [title for _, title, _ in columns]
    body = [[(f"{WINNER} " if row.get("winner") else "") + row["model"]]
            + [_show(row.get(key), how) for key, _, how in columns] for row in rows]
    return header, body


def _paired_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    body = []
    for row in rows:
        interval = "-" if math.isnan(row["ci_low"]) else \
            f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        values = {"pair": f"{row['a']} vs {row['b']}", "n": str(row["n"]),
                  "mean_difference": f"{row['mean_difference']:+.3f}", "interval": interval,
                  "wins": f"{row['wins']} of {row['n']}",
                  "wilcoxon_p": _show(row["wilcoxon_p"], "number"),
                  "holm_p": _show(row["holm_p"], "number"),
                  "rank_biserial": _show(row["rank_biserial"], "number"),
                  "training_s_ratio": "-" if math.isnan(row.get("training_s_ratio", math.nan))
                  else ratio_text(row["training_s_ratio"])}
        body.append([values[key] for key, _ in PAIRED])
    return [title for _, title in PAIRED], body


def sections(summary: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(heading, kind, content) in reading order; kind: text, list, table, figure."""
    out: list[tuple[str, str, Any]] = [("Headline", "list", summary["headline"])]
    out.append(("What was compared", "list",
                [f"{m['model']}: {m['text']}." for m in summary["methods"]]))
    budgets = summary["budgets"]
    if budgets["samples_seen"]:
        out.append(("Budgets", "text", budgets["note"] + "."))
    if summary["segmentation"]:
        out.append((f"Segmentation ({summary['segmentation_scope']})", "table",
                    _score_table(summary["segmentation"], "segmentation")))
    if summary["paired"]:
        out.append(("Segmentation, paired over the same cases", "table",
                    _paired_table(summary["paired"])))
        out.append(("Is the bigger model worth it?", "list", summary["verdicts"]))
    if summary["registration"]:
        out.append((f"Registration ({summary['registration_scope']})", "table",
                    _score_table(summary["registration"], "registration")))
    if summary["registration_paired"]:
        out.append(("Registration, paired over the same pairs", "table",
                    _paired_table(summary["registration_paired"])))
        out.append(("Registration verdicts", "list", summary["registration_verdicts"]))
    if summary["did_not_finish"]:
        out.append(("Did not finish", "list", [
            f"{r['model']} fold {r['fold']} ({r['task']}): {r['status']} after {r['epochs']} "
            f"epochs" + (f": {r['reason']}" if r["reason"] else "")
            for r in summary["did_not_finish"]]))
    out.append(("How to read this", "text",
                "Means are over cases with their standard deviation over cases. A "
                "difference is claimed only where the Wilcoxon signed-rank p, corrected by "
                "Holm's method across the pairs of a table, is below 0.05 (and the bootstrap "
                "95% interval, given only for n >= 10, excludes zero). Rank-biserial r: +1 "
                "when a is better on every case, 0 when no side is favoured."))
    for figure in summary["figures"]:
        out.append((figure["title"], "figure", figure["file"]))
    for example in summary["examples"]:
        out.append((f"Example, {example['task']}: {example['model']}", "figure",
                    example["file"]))
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# medpipe comparison", ""]
    for heading, kind, content in sections(summary):
        lines += [f"## {heading}", ""]
        if kind == "text":
            lines.append(content)
        elif kind == "list":
            lines += [f"- {item}" for item in content]
        elif kind == "table":
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            lines.append(f"![{heading}]({content})")
        lines.append("")
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:auto;padding:0 1em;"
         "color:#222}table{border-collapse:collapse;margin:.5em 0;display:block;overflow-x:auto;"
         "max-width:100%}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "th{background:#f2f2f2}tr.winner td{background:#eef7ee;font-weight:600}"
         "section.headline{background:#f5f8ff;border-left:4px solid #36c;padding:.4em 1em}"
         "img{max-width:100%}")


def page(summary: dict[str, Any], folder: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>medpipe comparison"
             f"</title><style>{STYLE}</style></head><body><h1>medpipe comparison</h1>"]
    for heading, kind, content in sections(summary):
        headline = " class='headline'" if heading == "Headline" else ""
        parts.append(f"<section{headline}><h2>{html.escape(heading)}</h2>")
        if kind == "text":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "list":
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
        else:
            data = base64.b64encode((folder / content).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(heading)}' "
                         f"src='data:image/png;base64,{data}'>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_reports(summary: dict[str, Any], folder: Path) -> None:
    for name, text in (("report.md", markdown(summary)), ("report.html", page(summary, folder))):
        with atomic_output(folder / name) as staging:
            staging.write_text(text, encoding="utf-8")
