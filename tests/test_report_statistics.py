"""The report's rules for claims that hold over repeated training runs, and its convergence
check, against cases built to pass or fail them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medpipe.report.statistics import (
    STILL_IMPROVING,
    claims_difference,
    convergence,
    holm,
    run_level_difference,
)


def _runs(means, cases=20, noise=0.01, seed=0):
    """One {case: score} per run: a per-run offset plus small per-case noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.7, 0.9, cases)
    return [{f"case_{k}": float(base[k] + m + rng.normal(0, noise)) for k in range(cases)}
            for m in means]


def _claimed(row):
    row["holm_p"] = holm([row["bootstrap_p"]])[0]
    return claims_difference(row)


def test_runs_that_agree_in_sign_support_a_claim():
    better = _runs([0.05, 0.06, 0.055], seed=1)
    worse = _runs([0.0, 0.01, 0.005], seed=1)
    row = run_level_difference(better, worse)
    assert row["runs_measured"] and row["signs_agree"] and row["run_pairs"] == 9
    assert row["mean_difference"] == pytest.approx(0.05, abs=0.01)
    assert 0 < row["ci_low"] < row["mean_difference"] < row["ci_high"]
    assert _claimed(row)


def test_one_run_pair_of_the_other_sign_refuses_the_claim():
    # on average a is better by 0.03, but one of a's runs is worse than one of b's
    a = _runs([0.05, 0.06, -0.01], seed=2)
    b = _runs([0.0, 0.01, 0.0], seed=2)
    row = run_level_difference(a, b)
    assert row["mean_difference"] > 0 and not row["signs_agree"]
    assert not _claimed(row)


def test_one_run_per_model_claims_nothing_however_clear_the_cases():
    # every case better by 0.1 (an exact Wilcoxon p of 1.9e-6), but one trained network each
    row = run_level_difference(_runs([0.1], seed=3), _runs([0.0], seed=3))
    assert not row["runs_measured"] and math.isnan(row["bootstrap_p"])
    assert math.isnan(row["run_sd_a"])
    assert not _claimed(row)


def test_the_spread_over_runs_widens_the_interval():
    # the same mean difference, the runs of a spread widely: the run level dominates
    tight = run_level_difference(_runs([0.02, 0.02, 0.02], seed=4), _runs([0.0] * 3, seed=4))
    loose = run_level_difference(_runs([0.06, -0.04, 0.04], seed=4), _runs([0.0] * 3, seed=4))
    assert (loose["ci_high"] - loose["ci_low"]) > 3 * (tight["ci_high"] - tight["ci_low"])
    assert loose["run_sd_a"] > 0.04 > tight["run_sd_a"]


def test_folds_pair_only_runs_that_scored_the_same_cases():
    # cross-validation: fold k of a and fold k of b share cases, other folds none
    a = [{"f0_x": 0.8, "f0_y": 0.7}, {"f1_x": 0.9, "f1_y": 0.6}]
    b = [{"f0_x": 0.7, "f0_y": 0.6}, {"f1_x": 0.8, "f1_y": 0.5}]
    row = run_level_difference(a, b)
    assert row["run_pairs"] == 2
    assert row["run_pair_differences"] == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("curve, improving", [
    ([(100, 0.3), (200, 0.5), (300, 0.62), (400, 0.70)], True),  # rising to the end
    ([(100, 0.5), (200, 0.78), (300, 0.8), (400, 0.801)], False),  # flat last quarter
])
def test_the_last_quarter_of_the_budget_decides_still_improving(curve, improving):
    result = convergence(curve)
    assert result["still_improving"] is improving
    expected = curve[-1][1] - np.interp(300, *np.asarray(curve).T)
    assert result["gain"] == pytest.approx(expected)
    assert (result["gain"] > STILL_IMPROVING) is improving


def test_a_saturating_curve_gives_the_budget_it_needs():
    samples = np.linspace(100, 1000, 10)
    dice = 0.85 - 0.6 * np.exp(-samples / 600)
    result = convergence(list(zip(samples, dice, strict=True)))
    assert result["still_improving"]
    # within 0.01 of 0.85 where 0.6 exp(-s / 600) = 0.01: s = 600 ln 60
    assert result["budget_needed"] == pytest.approx(600 * math.log(60), rel=0.05)


def test_one_validation_says_nothing_about_convergence():
    assert convergence([(400, 0.7)])["still_improving"] is None


def test_too_few_cases_give_no_interval_and_no_claim():
    row = run_level_difference(_runs([0.1, 0.1], cases=5, seed=5),
                               _runs([0.0, 0.0], cases=5, seed=5))
    assert row["too_few_cases"] and math.isnan(row["ci_low"]) and row["signs_agree"]
    assert not _claimed(row)


def test_two_methods_that_are_not_trained_are_compared_over_cases_alone():
    # a classical baseline answers the same every time: its one run is all there is
    row = run_level_difference(_runs([0.05], seed=6), _runs([0.0], seed=6), True, True)
    assert row["runs_measured"] and row["ci_low"] > 0 and _claimed(row)
