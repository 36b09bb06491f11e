"""Operating thresholds chosen on validation data: the highest cut-off that still catches enough COVID.

A screening tool's first duty is sensitivity, so each model (and the ensemble) gets the *highest*
threshold whose sensitivity on the validation set reaches the target; higher thresholds buy
specificity. Chosen on validation data only, never on the test set that reports the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from deepcovid import defaults
from deepcovid.results import ENSEMBLE_KEY


def _as_arrays(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-COVID) or 1 (COVID)")
    return y, s


def sensitivity_at(labels: object, scores: object, threshold: float) -> float:
    """TP / (TP + FN) with a positive call when score >= threshold."""
    y, s = _as_arrays(labels, scores)
    positives = s[y == 1]
    if positives.size == 0:
        raise ValueError("no positive (COVID) examples: sensitivity is undefined")
    return float((positives >= threshold).mean())


def specificity_at(labels: object, scores: object, threshold: float) -> float:
    """TN / (TN + FP) with a negative call when score < threshold."""
    y, s = _as_arrays(labels, scores)
    negatives = s[y == 0]
    if negatives.size == 0:
        raise ValueError("no negative (non-COVID) examples: specificity is undefined")
    return float((negatives < threshold).mean())


def threshold_for_sensitivity(
    labels: object, scores: object, target: float = defaults.TARGET_SENSITIVITY
) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target.

    Sensitivity only changes at positive scores, so the answer is the k-th highest positive score,
    k = ceil(target * P). Ties need no special case: every positive tied at that score is caught too.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _as_arrays(labels, scores)
    positives = np.sort(s[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive (COVID) examples: cannot choose a threshold for sensitivity")
    # round() first so that 0.98 * 50 = 49.000000000000007 asks for 49 positives, not 50.
    needed = max(1, math.ceil(round(target * positives.size, 9)))
    return float(positives[needed - 1])


def choose_thresholds(
    labels: object,
    probabilities: Mapping[str, object],
    ensemble_scores: object | None = None,
    target: float = defaults.TARGET_SENSITIVITY,
) -> dict[str, float]:
    """One threshold per architecture, plus one under ``ENSEMBLE_KEY`` when ensemble scores are given."""
    thresholds = {arch: threshold_for_sensitivity(labels, p, target) for arch, p in probabilities.items()}
    if ensemble_scores is not None:
        thresholds[ENSEMBLE_KEY] = threshold_for_sensitivity(labels, ensemble_scores, target)
    return thresholds
