"""Screening metrics in the paper's layout, with the confidence intervals the paper only approximated.

Deep-COVID reports sensitivity as 98% +- 2.7%: the normal approximation 1.96 * sqrt(p(1-p)/n) at
n = 100. That interval misbehaves near 100% (it can pass 1.0), so the reports carry the Wilson
score interval (primary) and the exact Clopper-Pearson interval next to it.
All functions take labels (1 = COVID) and COVID scores; a positive call is score >= threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta, norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from deepcovid import defaults


def _z(confidence: float) -> float:
    return float(norm.ppf(1 - (1 - confidence) / 2))


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (stays inside [0, 1], good at p near 1)."""
    _check_counts(successes, n)
    if n == 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes one bound is exactly 0 or 1; say so rather than 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def clopper_pearson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (conservative) binomial interval from beta quantiles."""
    _check_counts(successes, n)
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return (low, high)


def normal_half_width(successes: int, n: int, confidence: float = 0.95) -> float:
    """The paper's +- figure: z * sqrt(p(1-p)/n) (0.0274 for 98/100)."""
    _check_counts(successes, n)
    if n == 0:
        return math.nan
    p = successes / n
    return _z(confidence) * math.sqrt(p * (1 - p) / n)


@dataclass(frozen=True)
class Counts:
    """The confusion matrix at one threshold."""

    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp


def _arrays(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def counts_at(labels: object, scores: object, threshold: float) -> Counts:
    y, s = _arrays(labels, scores)
    called = s >= threshold
    return Counts(
        tp=int(np.sum(called & (y == 1))),
        fn=int(np.sum(~called & (y == 1))),
        tn=int(np.sum(~called & (y == 0))),
        fp=int(np.sum(called & (y == 0))),
    )


def _rate(successes: int, n: int, confidence: float) -> dict[str, Any]:
    if n == 0:
        return {
            "value": None,
            "successes": 0,
            "n": 0,
            "wilson": None,
            "clopper_pearson": None,
            "normal_pm": None,
        }
    return {
        "value": successes / n,
        "successes": successes,
        "n": n,
        "wilson": list(wilson_interval(successes, n, confidence)),
        "clopper_pearson": list(clopper_pearson_interval(successes, n, confidence)),
        "normal_pm": normal_half_width(successes, n, confidence),
    }


def operating_point(
    labels: object, scores: object, threshold: float, confidence: float = 0.95
) -> dict[str, Any]:
    """Sensitivity and specificity with their intervals, and the counts behind them, at one threshold."""
    c = counts_at(labels, scores, threshold)
    return {
        "threshold": float(threshold),
        "tp": c.tp,
        "fn": c.fn,
        "tn": c.tn,
        "fp": c.fp,
        "sensitivity": _rate(c.tp, c.positives, confidence),
        "specificity": _rate(c.tn, c.negatives, confidence),
    }


def threshold_table(
    labels: object,
    scores: object,
    thresholds: Iterable[float] = defaults.TABLE_THRESHOLDS,
    operating: float | None = None,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Rows of the paper's table (threshold | sensitivity | specificity), the operating row marked."""
    values = sorted(
        {round(float(t), 12) for t in thresholds} | ({float(operating)} if operating is not None else set())
    )
    rows = []
    for t in values:
        row = operating_point(labels, scores, t, confidence)
        row["operating"] = operating is not None and t == float(operating)
        rows.append(row)
    return rows


def roc_auc(labels: object, scores: object) -> float:
    y, s = _arrays(labels, scores)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, s))


def auc_with_ci(
    labels: object,
    scores: object,
    *,
    n_resamples: int = defaults.BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """ROC AUC with a percentile bootstrap interval, resampling COVID and non-COVID separately.

    Stratified resampling keeps both classes in every replicate, so no replicate is undefined.
    """
    y, s = _arrays(labels, scores)
    auc = roc_auc(y, s)
    if math.isnan(auc):
        return {"auc": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_resamples": 0}
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    y_boot = np.concatenate([np.ones(pos.size, dtype=int), np.zeros(neg.size, dtype=int)])
    replicates = np.empty(n_resamples)
    for i in range(n_resamples):
        boot = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        replicates[i] = roc_auc_score(y_boot, boot)
    alpha = 1 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return {"auc": auc, "ci_low": float(low), "ci_high": float(high), "n_resamples": n_resamples}


def roc_points(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds) from sklearn."""
    y, s = _arrays(labels, scores)
    return roc_curve(y, s)


def pr_points(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) from sklearn."""
    y, s = _arrays(labels, scores)
    return precision_recall_curve(y, s)


def average_precision(labels: object, scores: object) -> float:
    y, s = _arrays(labels, scores)
    if y.sum() == 0:
        return math.nan
    return float(average_precision_score(y, s))


def calibration(labels: object, scores: object, n_bins: int = 10) -> dict[str, list[float]]:
    """Observed COVID fraction against mean predicted probability per bin (empty bins dropped)."""
    y, s = _arrays(labels, scores)
    prob_true, prob_pred = calibration_curve(y, np.clip(s, 0.0, 1.0), n_bins=n_bins, strategy="uniform")
    return {"observed": prob_true.tolist(), "predicted": prob_pred.tolist()}


def summarize(
    labels: object,
    scores: object,
    operating_threshold: float,
    *,
    thresholds: Sequence[float] = defaults.TABLE_THRESHOLDS,
    confidence: float = 0.95,
    n_resamples: int = defaults.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report shows for one scorer (a model or the ensemble), JSON-ready."""
    y, s = _arrays(labels, scores)
    op = operating_point(y, s, operating_threshold, confidence)
    return {
        "n": int(y.size),
        "n_covid": int(y.sum()),
        "n_non_covid": int((y == 0).sum()),
        "operating_point": op,
        "confusion_matrix": [[op["tn"], op["fp"]], [op["fn"], op["tp"]]],
        "roc_auc": auc_with_ci(y, s, n_resamples=n_resamples, confidence=confidence, seed=seed),
        "average_precision": average_precision(y, s),
        "table": threshold_table(y, s, thresholds, operating_threshold, confidence),
        "calibration": calibration(y, s) if 0 < y.sum() < y.size else None,
    }


def strict_json(value: Any) -> Any:
    """Metrics as strict JSON (bundle manifests, metrics.json): NaN/inf to None, numpy scalars to Python,
    tuples to lists."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
