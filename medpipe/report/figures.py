"""The comparison's figures: per-case paired plots and Dice against cost. Each returns
(title, file name) so the report heads it with what it shows, not with its file name."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe import tracked
from medpipe.figures import save_figure
from medpipe.tracking import TrackedRun


def per_case(scores: Mapping[str, Mapping[tuple, float]], path: Path, title: str,
             ) -> dict[str, str]:
    """Methods left to right (best first), each case a grey line across them: a paired
    difference shows as lines that slope the same way, not as two overlapping boxes."""
    import matplotlib.pyplot as plt

    methods = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(methods) + 1.5), 3.6))
    cases = sorted(set().union(*(set(v) for v in scores.values())))
    for case in cases:
        values = [scores[m].get(case, math.nan) for m in methods]
        ax.plot(range(len(methods)), values, "-", color="0.75", linewidth=0.8, zorder=1)
    for index, method in enumerate(methods):
        values = list(scores[method].values())
        ax.scatter(np.full(len(values), index), values, s=14, zorder=2)
        ax.hlines(np.mean(values), index - 0.25, index + 0.25, color="black", zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=20 if len(methods) > 4 else 0)
    ax.set_ylabel("mean Dice over classes")
    ax.set_title(f"n = {len(cases)}; black bar: mean", fontsize=9)
    fig.tight_layout()
    return {"title": title, "file": save_figure(fig, path).name}


def dice_versus_cost(runs: Sequence[TrackedRun], rows: Mapping[str, Mapping[str, Any]],
                     path: Path) -> dict[str, str]:
    """Validation Dice along training, against samples seen and against training seconds
    (the axes on which "at equal cost" is read), one line per run (fold or seed), a model's
    runs in one colour under one legend entry, so that their spread reads as the run-to-run
    variance; the final score of the table (test set or cross-validation) marked at each
    model's final cost."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours: dict[str, Any] = {}
    for run in runs:
        model = run.tags[tracked.MODEL]
        label = model if model not in colours else "_nolegend_"  # one entry per model
        for ax, cost in zip(axes, (tracked.SAMPLES_SEEN, tracked.ELAPSED_SECONDS), strict=True):
            curve = run.cost_curve(cost)
            if not curve:  # runs from before costs were logged: epochs are not comparable
                continue
            x, y = zip(*curve, strict=True)
            x = np.asarray(x) / (60.0 if cost == tracked.ELAPSED_SECONDS else 1.0)
            line, = ax.plot(x, y, "o-", markersize=3, label=label, color=colours.get(model))
            colours.setdefault(model, line.get_color())
    for model, row in rows.items():
        mean = row["mean_dice"][0]
        if model not in colours or math.isnan(mean):
            continue
        for ax, cost in zip(axes, (row["samples_seen"], row["training_s"] / 60.0), strict=True):
            if not math.isnan(cost):
                ax.plot([cost], [mean], "*", markersize=11, color=colours[model])
    axes[0].set_xlabel("training samples seen (patches or pairs)")
    axes[1].set_xlabel("training minutes (with validation)")
    axes[0].set_ylabel("validation Dice")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=7, loc="lower right")
    fig.suptitle("Dice at equal cost (lines: validation along training; stars: the final "
                 "score in the tables)", fontsize=9)
    fig.tight_layout()
    return {"title": "Dice against training cost", "file": save_figure(fig, path).name}


def accuracy_versus_speed(table: Sequence[Mapping[str, Any]], path: Path,
                          scope: str) -> dict[str, str] | None:
    """Registration's answer at a glance: each method's mean Dice of warped labels (bars:
    one SD over pairs) against its seconds per pair on a log axis, so the frontier (the
    most accurate method at each speed) reads off the upper left; None without timings."""
    import matplotlib.pyplot as plt

    points = [(row["model"], row["inference_s_per_case"], *row["mean_dice"]) for row in table
              if row["inference_s_per_case"] > 0 and not math.isnan(row["mean_dice"][0])]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, seconds, mean, sd in points:
        ax.errorbar([seconds], [mean], yerr=[sd], fmt="o", capsize=3, markersize=6)
        ax.annotate(name, (seconds, mean), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per pair (log scale; this machine, as measured)")
    ax.set_ylabel("mean Dice of warped labels")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"Accuracy against speed ({scope}); bars: one SD over pairs", fontsize=9)
    fig.tight_layout()
    return {"title": "Registration: Dice against seconds per pair",
            "file": save_figure(fig, path).name}
