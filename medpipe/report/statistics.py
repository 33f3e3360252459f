"""Paired comparisons of two methods scored on the same cases: what the report concludes.

Per pair of methods: the mean per-case difference, the two-sided Wilcoxon signed-rank test
(scipy), its p-value corrected across every pair of one table by Holm's step-down method
(the family-wise error stays at 5 % however many pairs are compared), two effect sizes (the
matched-pairs rank-biserial correlation, which goes with the rank test, and Cohen's d_z, the
mean difference in standard deviations of the differences), and a bootstrap 95 % interval
of the mean difference only where there are enough cases for one: with fewer than
`MIN_CASES_FOR_INTERVAL` a percentile bootstrap undercovers badly and looks decisive when
it is not (3 cases give an interval as narrow as their spread, and the smallest two-sided
Wilcoxon p with 3 cases is 0.25).
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


def shows_difference(row: dict) -> bool:
    """A difference is claimed when the Holm-adjusted p is below 5 % and, where there is an
    interval, it excludes zero."""
    p = row.get("holm_p", math.nan)
    if math.isnan(p) or p >= SIGNIFICANCE:
        return False
    low, high = row["ci_low"], row["ci_high"]
    return math.isnan(low) or low > 0 or high < 0
