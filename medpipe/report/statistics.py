"""Comparisons of methods scored on the same cases: what the report concludes.

Per pair of methods, over the cases (one trained network each): the mean per-case
difference, the two-sided Wilcoxon signed-rank test (scipy), its p-value corrected across
every pair of one table by Holm's step-down method, two effect sizes (the matched-pairs
rank-biserial correlation and Cohen's d_z), and a bootstrap 95 % interval of the mean
difference only where there are enough cases for one (`MIN_CASES_FOR_INTERVAL`: a
percentile bootstrap of 3 cases undercovers badly and looks decisive when it is not).

Over the training runs (`run_level_difference`): what a claim rests on, since a p-value over
the cases of one trained network per model says nothing about training it again (the
spread between seeds can exceed the difference between models). A claim needs every run
pair to agree in sign and a hierarchical bootstrap (runs, then cases) that excludes zero
after Holm's correction (`claims_difference`); and `convergence` says whether a model was
still improving when its budget ran out, among which no winner is declared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata, wilcoxon

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_CASES_FOR_INTERVAL = 10
SIGNIFICANCE = 0.05


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a - b over paired cases with its Wilcoxon p (NaN when every difference is 0),
    effect sizes and, where n allows, the bootstrap 95 % interval (else NaN)."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    n = len(diff)
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else math.nan
    low = high = math.nan
    if n >= MIN_CASES_FOR_INTERVAL:
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        means = diff[rng.integers(0, n, (BOOTSTRAP_SAMPLES, n))].mean(axis=1)
        low, high = float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
    spread = float(np.std(diff, ddof=1)) if n > 1 else math.nan
    return {"n": n, "mean_difference": float(diff.mean()), "sd_difference": spread,
            "ci_low": low, "ci_high": high, "wilcoxon_p": p,
            "rank_biserial": rank_biserial(diff),
            "cohens_dz": float(diff.mean()) / spread if spread and spread > 0 else math.nan,
            "wins": int(np.sum(diff > 0)), "losses": int(np.sum(diff < 0))}


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (W+ - W-) / (W+ + W-) over the
    non-zero differences' ranks; +1 when a wins on every case, -1 when it loses on all."""
    nonzero = diff[diff != 0]
    if not len(nonzero):
        return math.nan
    ranks = rankdata(np.abs(nonzero))
    positive, negative = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    return float((positive - negative) / (positive + negative))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order; NaN (no test) stays NaN and
    does not count towards the number of tests."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(tested)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


# --------------------------------------------------------------------------- repeated runs

HIERARCHICAL_SAMPLES = 4000


def run_level_difference(runs_a: Sequence[dict], runs_b: Sequence[dict],
                         a_fixed: bool = False, b_fixed: bool = False) -> dict:
    """A against B where each is trained more than once: RUNS_A and RUNS_B hold one
    {case: score} per training run (a seed or a fold). Every pair of runs (one of each)
    that scored the same cases gives a mean difference over those cases: a difference is
    claimed only when they all have one sign (`signs_agree`) and the hierarchical
    bootstrap (runs resampled, then cases within each run pair: Saravanan et al. 2020,
    "Application of the hierarchical bootstrap to multi-level data in neuroscience") puts
    zero outside its interval (not drawn where a run pair shares fewer than
    MIN_CASES_FOR_INTERVAL cases: `too_few_cases`). With one run on either side the
    run-to-run spread is not
    measured and nothing is claimed (`runs_measured` False), unless that side is FIXED: a
    method that is not trained (a classical baseline) answers the same every time."""
    pairs = [(i, j, np.asarray([a[k] - b[k] for k in sorted(set(a) & set(b))], float))
             for i, a in enumerate(runs_a) for j, b in enumerate(runs_b)]
    pairs = [(i, j, d) for i, j, d in pairs if len(d)]
    means = [float(d.mean()) for _, _, d in pairs]
    out = {"runs_a": len(runs_a), "runs_b": len(runs_b), "run_pairs": len(pairs),
           "run_pair_differences": means,
           "mean_difference": float(np.mean(means)) if means else math.nan,
           "signs_agree": bool(means) and (all(m > 0 for m in means)
                                           or all(m < 0 for m in means)),
           "runs_measured": (len(runs_a) > 1 or a_fixed) and (len(runs_b) > 1 or b_fixed),
           "run_sd_a": _run_sd(runs_a), "run_sd_b": _run_sd(runs_b),
           "ci_low": math.nan, "ci_high": math.nan, "bootstrap_p": math.nan,
           "too_few_cases": any(len(d) < MIN_CASES_FOR_INTERVAL for _, _, d in pairs)}
    if not out["runs_measured"] or not pairs or out["too_few_cases"]:
        return out
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    by_pair = {(i, j): d for i, j, d in pairs}
    stats = []
    for _ in range(HIERARCHICAL_SAMPLES):
        chosen_a = rng.integers(0, len(runs_a), len(runs_a))
        chosen_b = rng.integers(0, len(runs_b), len(runs_b))
        values = [d[rng.integers(0, len(d), len(d))].mean()
                  for i in chosen_a for j in chosen_b if (d := by_pair.get((i, j))) is not None]
        if values:
            stats.append(np.mean(values))
    stats = np.asarray(stats)
    out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(stats, [2.5, 97.5]))
    tail = min(np.mean(stats <= 0), np.mean(stats >= 0))
    out["bootstrap_p"] = float(min(1.0, max(2 * tail, 1 / len(stats))))
    return out


def _run_sd(runs: Sequence[dict]) -> float:
    """The spread over runs of each run's mean score (NaN for one run)."""
    means = [float(np.mean(list(r.values()))) for r in runs if r]
    return float(np.std(means, ddof=1)) if len(means) > 1 else math.nan


def claims_difference(row: dict) -> bool:
    """Repeated runs: claimed when run-to-run spread was measured, every run pair agrees in
    sign, and the Holm-adjusted hierarchical-bootstrap p is below 5 %."""
    p = row.get("holm_p", math.nan)
    return (row["runs_measured"] and row["signs_agree"] and not math.isnan(p)
            and p < SIGNIFICANCE)


# --------------------------------------------------------------------------- convergence

STILL_IMPROVING = 0.01  # mean Dice gained over the last quarter of the budget


def convergence(curve: Sequence[tuple[float, float]]) -> dict:
    """From a validation curve [(samples seen, Dice)]: the Dice gained over the last quarter
    of the samples (`gain`: the last value less the value at 3/4 of the budget, linearly
    interpolated), `still_improving` above STILL_IMPROVING, and, where a saturating curve
    a - b exp(-s / t) fits the points, the budget at which it comes within STILL_IMPROVING
    of its limit (`budget_needed`, else NaN). Fewer than two points: nothing is known."""
    points = sorted((float(s), float(d)) for s, d in curve if not math.isnan(d))
    out = {"points": len(points), "gain": math.nan, "still_improving": None,
           "budget_needed": math.nan}
    if len(points) < 2:
        return out
    samples, dice = np.asarray(points).T
    three_quarters = samples[-1] * 0.75
    if three_quarters < samples[0]:  # no validation before the last quarter began
        return out
    out["gain"] = float(dice[-1] - np.interp(three_quarters, samples, dice))
    out["still_improving"] = out["gain"] > STILL_IMPROVING
    if out["still_improving"] and len(points) >= 4:
        out["budget_needed"] = _saturation_budget(samples, dice)
    return out


def _saturation_budget(samples: np.ndarray, dice: np.ndarray) -> float:
    from scipy.optimize import curve_fit

    def curve(s, a, b, t):
        return a - b * np.exp(-s / t)

    try:
        (a, b, t), _ = curve_fit(curve, samples, dice, p0=(dice[-1] + 0.05, 0.5,
                                                           samples[-1] / 2),
                                 bounds=([0, 0, 1e-9], [1, 10, 1e9]), maxfev=5000)
    except (RuntimeError, ValueError):
        return math.nan
    if b <= STILL_IMPROVING:
        return math.nan
    residual = np.sqrt(np.mean((curve(samples, a, b, t) - dice) ** 2))
    if residual > 0.02:  # the curve is not that shape: no estimate
        return math.nan
    return float(t * math.log(b / STILL_IMPROVING))
