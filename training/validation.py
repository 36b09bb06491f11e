"""What a trained bundle records about its validation data: the temperatures fitted on it, the thresholds
chosen on the calibrated probabilities, AUCs, operating points and ECEs, and how far bf16 moves its
probabilities (which decides whether CPU workers may use bf16)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcovid.ensemble import combine
from deepcovid.networks import prepare_network
from deepcovid.precision import precision_drift
from deepcovid.results import ENSEMBLE_KEY
from training.calibration import calibration_summary, covid_probability, fit_temperature
from training.metrics import operating_point, roc_auc, strict_json
from training.thresholds import choose_thresholds

log = logging.getLogger(__name__)

POLICY = "mean"
"""The ensemble rule of trained bundles: their ensemble threshold is chosen on its scores."""


@dataclass
class ValidationRecord:
    """Temperatures and thresholds chosen on the validation split, and the bundle's
    ``metrics["validation"]``."""

    thresholds: dict[str, float]  # per network
    ensemble_threshold: float
    metrics: dict[str, Any]
    temperatures: dict[str, float] = field(default_factory=dict)  # per network


def validation_record(
    labels: np.ndarray, logits: Mapping[str, np.ndarray], target: float
) -> ValidationRecord:
    """Each network's temperature fitted on its ``logits`` [N, classes]; then, on the calibrated
    probabilities (what the Ensemble will score), each network's and the ensemble's threshold for
    ``target`` sensitivity, with the AUCs, operating points and ECEs they give on the same data
    (optimistic, and said so)."""
    temperatures = {arch: fit_temperature(z, labels) for arch, z in logits.items()}
    raw = {arch: covid_probability(z) for arch, z in logits.items()}
    probabilities = {arch: covid_probability(z, temperatures[arch]) for arch, z in logits.items()}
    ensemble_scores = combine(probabilities, policy=POLICY).ensemble_score
    thresholds = choose_thresholds(labels, probabilities, ensemble_scores, target=target)
    scores = {**probabilities, ENSEMBLE_KEY: ensemble_scores}
    before = {**raw, ENSEMBLE_KEY: combine(raw, policy=POLICY).ensemble_score}
    metrics = {
        "target_sensitivity": target,
        "n": int(labels.size),
        "temperature": {arch: round(t, 6) for arch, t in temperatures.items()},
        "calibration": strict_json(calibration_summary(labels, before, scores, temperatures)),
        "auc": {name: strict_json(roc_auc(labels, s)) for name, s in scores.items()},
        "operating_points": {
            name: strict_json(operating_point(labels, s, thresholds[name])) for name, s in scores.items()
        },
        "note": "thresholds were chosen on this validation set, so these operating points are optimistic",
    }
    ensemble_threshold = thresholds.pop(ENSEMBLE_KEY)
    return ValidationRecord(
        thresholds=thresholds,
        ensemble_threshold=ensemble_threshold,
        metrics=metrics,
        temperatures=temperatures,
    )


def bf16_check(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    limit: int,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per network, the largest bf16-vs-fp32 change of a COVID probability on up to ``limit`` validation
    images, measured on CPU as workers will run it (BatchNorm folded). Stored in the bundle: a CPU worker
    scores in bf16 only where this stays within its tolerance (``DEEPCOVID_BF16_TOLERANCE``)."""
    cpu = torch.device("cpu")
    served = {arch: prepare_network(copy.deepcopy(model).float(), cpu) for arch, model in models.items()}
    drift = precision_drift(served, images[:limit], torch.bfloat16, cpu, temperatures=temperatures)
    log.info("bf16 vs fp32 on %d validation images: %s", min(limit, int(images.shape[0])), drift)
    return {arch: round(value, 6) for arch, value in drift.items()}
