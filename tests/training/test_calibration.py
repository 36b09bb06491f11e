"""Temperature scaling: fitting recovers a known temperature, lowers the ECE of an over-confident network,
and the thresholds are chosen on the calibrated probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from deepcovid.results import ENSEMBLE_KEY
from training.calibration import (
    covid_probability,
    expected_calibration_error,
    fit_temperature,
    uncalibrated,
)
from training.thresholds import threshold_for_sensitivity
from training.validation import validation_record


def _calibrated_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, 2] whose softmax is the true COVID probability of labels drawn from it."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(int)
    return np.stack([np.zeros(n), margin], axis=1), labels


def test_fitting_recovers_a_known_temperature() -> None:
    logits, labels = _calibrated_set(20_000, seed=1)
    assert fit_temperature(logits * 3.0, labels) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(logits * 3.0, labels) == fit_temperature(logits * 3.0, labels)  # deterministic


def test_calibration_lowers_the_ece_of_an_over_confident_network() -> None:
    logits, labels = _calibrated_set(4_000, seed=2)
    overconfident = logits * 4.0
    temperature = fit_temperature(overconfident, labels)
    before = expected_calibration_error(labels, covid_probability(overconfident))
    after = expected_calibration_error(labels, covid_probability(overconfident, temperature))
    assert after <= before
    assert after < 0.05 < before


def test_nothing_to_fit_means_temperature_one() -> None:
    logits, labels = _calibrated_set(50, seed=3)
    assert fit_temperature(logits, np.ones(50, dtype=int)) == 1.0  # one class only
    assert fit_temperature(np.zeros((50, 2)), labels) == 1.0  # a dead network: every image alike
    assert fit_temperature(np.empty((0, 2)), np.empty(0, dtype=int)) == 1.0


def test_uncalibrated_inverts_temperature_scaling() -> None:
    logits, _ = _calibrated_set(100, seed=4)
    calibrated = covid_probability(logits, 2.5)
    np.testing.assert_allclose(uncalibrated(calibrated, 2.5), covid_probability(logits), rtol=1e-4, atol=1e-6)
    assert uncalibrated(np.array([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_ece_of_known_bins() -> None:
    # Bin [0.9, 1): mean prediction 0.9, observed 0.5 -> gap 0.4 on half the images; bin [0.1, 0.2): 0.
    labels = np.array([1, 0, 0, 0])
    probabilities = np.array([0.9, 0.9, 0.1, 0.1])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_thresholds_are_chosen_on_calibrated_probabilities() -> None:
    logits, labels = _calibrated_set(400, seed=5)
    record = validation_record(labels, {"resnet18": logits * 3.0, "squeezenet1_1": logits * 0.5}, 0.98)
    assert record.temperatures["resnet18"] == pytest.approx(3.0, rel=0.25)
    for arch, scale in (("resnet18", 3.0), ("squeezenet1_1", 0.5)):
        calibrated = covid_probability(logits * scale, record.temperatures[arch])
        assert record.thresholds[arch] == threshold_for_sensitivity(labels, calibrated, 0.98)
    calibration = record.metrics["calibration"]
    assert set(calibration) == {"resnet18", "squeezenet1_1", ENSEMBLE_KEY}
    assert calibration["resnet18"]["ece_after"] <= calibration["resnet18"]["ece_before"]
    assert calibration[ENSEMBLE_KEY]["temperature"] is None
