"""Interval math and metric tables against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    auc_with_ci,
    clopper_pearson_interval,
    counts_at,
    normal_half_width,
    operating_point,
    summarize,
    threshold_table,
    wilson_interval,
)


def test_wilson_98_of_100() -> None:
    low, high = wilson_interval(98, 100)
    assert low == pytest.approx(0.9300, abs=5e-5)
    assert high == pytest.approx(0.9945, abs=5e-5)


def test_wilson_by_formula_and_edges() -> None:
    z = 1.959963984540054
    n, k = 20, 5
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=5e-5)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_clopper_pearson_98_of_100() -> None:
    low, high = clopper_pearson_interval(98, 100)
    assert low == pytest.approx(0.9296, abs=5e-5)
    assert high == pytest.approx(0.9976, abs=5e-5)
    # All successes: lower bound (alpha/2)^(1/n), upper bound 1.
    low, high = clopper_pearson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10))
    assert clopper_pearson_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))


def test_paper_normal_approximation() -> None:
    # Deep-COVID: 98% sensitivity +- 2.7% on 100 COVID images.
    assert normal_half_width(98, 100) == pytest.approx(1.96 * math.sqrt(0.98 * 0.02 / 100), abs=1e-4)
    assert normal_half_width(98, 100) == pytest.approx(0.0274, abs=1e-4)


def test_counts_and_table_layout() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.95, 0.85, 0.45, 0.15, 0.55, 0.35, 0.25, 0.05])
    c = counts_at(labels, scores, 0.5)
    assert (c.tp, c.fn, c.tn, c.fp) == (2, 2, 3, 1)
    op = operating_point(labels, scores, 0.4)
    assert op["sensitivity"]["value"] == 0.75 and op["specificity"]["value"] == 0.75
    assert op["sensitivity"]["wilson"] == pytest.approx(list(wilson_interval(3, 4)))
    rows = threshold_table(labels, scores, (0.1, 0.5, 0.9), operating=0.4)
    assert [r["threshold"] for r in rows] == [0.1, 0.4, 0.5, 0.9]
    assert [r["operating"] for r in rows] == [False, True, False, False]
    assert [r["sensitivity"]["value"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    assert [r["specificity"]["value"] for r in rows] == [0.25, 0.75, 0.75, 1.0]


def test_auc_bootstrap_is_seeded_and_brackets_auc() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(60, int), np.zeros(60, int)]
    scores = np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 60)]
    a = auc_with_ci(labels, scores, n_resamples=300, seed=3)
    b = auc_with_ci(labels, scores, n_resamples=300, seed=3)
    assert a == b
    assert a["ci_low"] < a["auc"] < a["ci_high"]
    perfect = auc_with_ci([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], n_resamples=50)
    assert perfect["auc"] == 1.0 and perfect["ci_low"] == 1.0


def test_summarize_is_json_ready() -> None:
    import json

    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.7, 0.3, 0.4, 0.2, 0.1]
    s = summarize(labels, scores, 0.3, n_resamples=100)
    json.dumps(s)
    assert s["confusion_matrix"] == [[2, 1], [0, 3]]
    assert s["roc_auc"]["auc"] == pytest.approx(8 / 9)
    assert 0 < s["average_precision"] <= 1
    assert s["calibration"]["observed"]
