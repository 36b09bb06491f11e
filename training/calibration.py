"""Temperature scaling: one scalar T > 0 per network, fitted on validation logits, and the ECE it buys.

A network trained to separate classes is usually over-confident; dividing its logits by T (fitted to
minimise the validation NLL of softmax(logits / T)) makes its probabilities mean what they say without
changing its ranking (AUC), so thresholds are then chosen on the calibrated probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit

from deepcovid.networks import COVID_INDEX
from deepcovid.results import ENSEMBLE_KEY

ECE_BINS = 10
# log T is searched within these bounds: T from 1/100 to 100 covers any network worth calibrating.
_LOG_T_BOUNDS = (-math.log(100.0), math.log(100.0))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / T) for class indices ``labels``."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(labels.size), labels].mean())


def fit_temperature(logits: object, labels: object) -> float:
    """The T minimising the NLL of softmax(logits / T) on ``logits`` [N, classes]; 1.0 when there is
    nothing to fit (no data, one class only, or logits that do not tell the images apart).

    A bounded 1-D search on log T: the NLL is convex in 1/T, so it is unimodal and the search is exact
    and deterministic.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int).ravel()
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"need logits [N, classes] for N={y.size} labels, got shape {z.shape}")
    if y.size == 0 or np.unique(y).size < 2 or not np.isfinite(z).all():
        return 1.0
    if np.ptp(z - z.mean(axis=1, keepdims=True), axis=0).max() == 0.0:
        return 1.0  # every image gets the same probabilities: T changes nothing the data can judge
    result = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def covid_probability(logits: object, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T)[:, COVID] exactly as ``deepcovid.ensemble.Ensemble`` computes it (float32
    torch), so a threshold set at a validation score is met by the same score when screening."""
    import torch

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return torch.softmax(z / float(temperature), dim=1)[:, COVID_INDEX].to(torch.float64).numpy()


def uncalibrated(probabilities: object, temperature: float) -> np.ndarray:
    """The COVID probability before temperature scaling, recovered from the calibrated one (two classes:
    p = sigmoid(margin / T), so the uncalibrated is sigmoid(T * logit(p)))."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return expit(temperature * logit(p))


def expected_calibration_error(labels: object, probabilities: object, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins of the COVID probability: the image-weighted mean gap
    between each bin's mean predicted probability and its observed COVID fraction."""
    y = np.asarray(labels).astype(float).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 0.0, 1.0)
    if y.size == 0:
        return math.nan
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    gap = 0.0
    for b in np.unique(bins):
        inside = bins == b
        gap += inside.sum() * abs(p[inside].mean() - y[inside].mean())
    return float(gap / y.size)


def reliability_bins(labels: object, probabilities: object, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per non-empty bin (equal width): mean predicted probability, observed COVID fraction, images."""
    y = np.asarray(labels).astype(float).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 0.0, 1.0)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out: dict[str, list[float]] = {"predicted": [], "observed": [], "count": []}
    for b in np.unique(bins):
        inside = bins == b
        out["predicted"].append(float(p[inside].mean()))
        out["observed"].append(float(y[inside].mean()))
        out["count"].append(int(inside.sum()))
    return out


def calibration_summary(
    labels: np.ndarray,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    temperatures: Mapping[str, float],
) -> dict[str, dict[str, float | None]]:
    """Per scorer (each network, and ``ENSEMBLE_KEY`` when given): its temperature (None for the
    ensemble) and the ECE of its scores before and after temperature scaling."""
    return {
        name: {
            "temperature": None if name == ENSEMBLE_KEY else float(temperatures.get(name, 1.0)),
            "ece_before": expected_calibration_error(labels, before[name]),
            "ece_after": expected_calibration_error(labels, after[name]),
        }
        for name in after
    }
