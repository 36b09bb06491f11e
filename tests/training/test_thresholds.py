"""Operating thresholds: the highest cut-off that reaches the target sensitivity, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from training.thresholds import choose_thresholds, sensitivity_at, specificity_at, threshold_for_sensitivity


def test_highest_threshold_reaching_target() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1]
    # 3 of 4 positives needed for 0.75: the third-highest positive score.
    assert threshold_for_sensitivity(labels, scores, 0.75) == 0.7
    assert threshold_for_sensitivity(labels, scores, 0.5) == 0.8
    # Just above 0.75 needs all four.
    assert threshold_for_sensitivity(labels, scores, 0.76) == 0.2
    assert sensitivity_at(labels, scores, 0.7) == 0.75
    assert sensitivity_at(labels, scores, 0.7 + 1e-9) == 0.5


def test_target_one_takes_lowest_positive() -> None:
    labels = [1, 0, 1, 0, 1]
    scores = [0.4, 0.9, 0.95, 0.05, 0.6]
    t = threshold_for_sensitivity(labels, scores, 1.0)
    assert t == 0.4
    assert sensitivity_at(labels, scores, t) == 1.0
    assert specificity_at(labels, scores, t) == 0.5


def test_ties_count_all_tied_positives() -> None:
    labels = [1, 1, 1, 1, 0]
    scores = [0.5, 0.5, 0.5, 0.9, 0.5]
    # 0.5 catches all positives; no higher threshold reaches 0.98.
    assert threshold_for_sensitivity(labels, scores, 0.98) == 0.5
    assert threshold_for_sensitivity(labels, scores, 0.25) == 0.9
    # The tied negative is called positive at 0.5 (score >= threshold).
    assert specificity_at(labels, scores, 0.5) == 0.0


def test_float_rounding_of_target_times_count() -> None:
    labels = np.r_[np.ones(50, int), np.zeros(5, int)]
    scores = np.r_[np.linspace(1.0, 0.51, 50), np.zeros(5)]
    t = threshold_for_sensitivity(labels, scores, 0.98)  # 0.98 * 50 = 49.000000000000007
    assert sensitivity_at(labels, scores, t) == 0.98
    assert t == pytest.approx(scores[48])


def test_result_always_meets_target_random() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], n) if rng.random() < 0.5 else rng.random(n)
        target = float(rng.choice([0.5, 0.9, 0.95, 0.98, 1.0]))
        t = threshold_for_sensitivity(labels, scores, target)
        assert sensitivity_at(labels, scores, t) >= target
        higher = scores[scores > t]
        if higher.size:  # the next higher candidate falls short
            assert sensitivity_at(labels, scores, higher.min()) < target


def test_errors() -> None:
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity([0, 0, 0], [0.1, 0.2, 0.3], 0.9)
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity([1, 0], [0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity([1, 0], [0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="length"):
        threshold_for_sensitivity([1, 0], [0.1], 0.9)


def test_choose_thresholds_adds_ensemble() -> None:
    labels = [1, 1, 0, 0]
    chosen = choose_thresholds(
        labels,
        {"resnet18": [0.9, 0.6, 0.2, 0.1], "squeezenet1_1": [0.8, 0.7, 0.75, 0.1]},
        [0.85, 0.65, 0.4, 0.1],
        1.0,
    )
    assert chosen == {"resnet18": 0.6, "squeezenet1_1": 0.7, "ensemble": 0.65}
