"""Grad-CAM maps: shape, the probability each explains, policy weights, and faithfulness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepcovid.batches import collate, normalize
from deepcovid.ensemble import Ensemble
from deepcovid.explain import explain_batch, explain_bytes, gradcam_at, policy_weights
from deepcovid.networks import prepare_network
from deepcovid.preprocess import INPUT_SIZE, load_image
from deepcovid.results import ENSEMBLE_KEY
from tests.fixtures.images import jpeg_bytes, synthetic_batch


@pytest.fixture(scope="module")
def full_ensemble(full_bundle_path: Path) -> Ensemble:
    return Ensemble.from_bundle(full_bundle_path, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_bundle_path: Path) -> Ensemble:
    return Ensemble.from_bundle(tiny_bundle_path, device="cpu", precision="fp32")


def test_every_network_and_the_ensemble_get_a_map_explaining_its_score(full_ensemble: Ensemble) -> None:
    """The four networks, prepared as the worker runs them (BatchNorm folded, channels_last)."""
    batch = torch.from_numpy(synthetic_batch(2, seed=3))
    explanations = explain_batch(full_ensemble, batch)
    scored = full_ensemble.score(batch)
    assert len(explanations) == 2
    for i, explanation in enumerate(explanations):
        assert set(explanation.maps) == {*full_ensemble.architectures, ENSEMBLE_KEY}
        for heat in explanation.maps.values():
            assert heat.shape == (INPUT_SIZE, INPUT_SIZE) and heat.dtype == np.float32
            assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.std() > 1e-3  # not constant
        fields = scored.result_fields(i)
        for arch, probability in fields["probabilities"].items():
            assert explanation.probabilities[arch] == pytest.approx(probability, abs=1e-6)
        assert explanation.probabilities[ENSEMBLE_KEY] == pytest.approx(fields["ensemble_score"], abs=1e-6)
        mean = np.mean([explanation.maps[a] for a in full_ensemble.architectures], axis=0)
        np.testing.assert_allclose(explanation.maps[ENSEMBLE_KEY], mean, atol=1e-6)


def test_a_file_s_map_explains_the_score_the_pipeline_gives_it(tiny_ensemble: Ensemble) -> None:
    data = jpeg_bytes(size=(600, 420), seed=5)
    explained = explain_bytes(tiny_ensemble, data)
    pipeline_input, _ = load_image(data)  # what screen and the worker score
    scored = tiny_ensemble.score(collate([pipeline_input]))
    assert explained.explanation.probabilities[ENSEMBLE_KEY] == pytest.approx(
        float(scored.ensemble_score[0]), abs=1e-6
    )
    assert explained.pixels.shape[:2] == (420, 600)
    assert (explained.geometry.width, explained.geometry.height) == (600, 420)


def test_maps_under_bf16_autocast_explain_the_bf16_scores(tiny_bundle_path: Path) -> None:
    """The precision rules hold for maps too: the forward pass that makes them runs in the same autocast."""
    ensemble = Ensemble.from_bundle(tiny_bundle_path, device="cpu", precision="fp32")
    ensemble.autocast_dtype = torch.bfloat16  # as autocast_dtype() chooses on a CPU with native bf16
    batch = torch.from_numpy(synthetic_batch(2, seed=6))
    scored = ensemble.score(batch)
    for i, explanation in enumerate(explain_batch(ensemble, batch)):
        for arch in ensemble.architectures:
            assert explanation.probabilities[arch] == pytest.approx(scored.probabilities[arch][i], abs=1e-6)
            assert explanation.maps[arch].dtype == np.float32 and explanation.maps[arch].std() > 1e-3


def test_maps_explain_calibrated_scores(tiny_bundle_path: Path) -> None:
    """With a bundle temperature, the explained probability is the calibrated one the Ensemble stores."""
    ensemble = Ensemble.from_bundle(tiny_bundle_path, device="cpu", precision="fp32")
    ensemble.temperatures = dict.fromkeys(ensemble.architectures, 2.5)
    batch = torch.from_numpy(synthetic_batch(2, seed=8))
    scored = ensemble.score(batch)
    for i, explanation in enumerate(explain_batch(ensemble, batch)):
        for arch in ensemble.architectures:
            assert explanation.probabilities[arch] == pytest.approx(scored.probabilities[arch][i], abs=1e-6)


def test_policy_weights() -> None:
    probs = {"a": 0.2, "b": 0.9, "c": 0.4}
    assert policy_weights("mean", probs) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert policy_weights("majority", probs) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert policy_weights("any", probs) == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert policy_weights("any", {"a": 0.5, "b": 0.5}) == {"a": 0.5, "b": 0.5}


def test_the_any_policy_s_map_is_the_most_confident_network_s(tiny_bundle_path: Path) -> None:
    ensemble = Ensemble.from_bundle(tiny_bundle_path, device="cpu", precision="fp32")
    ensemble.policy = "any"
    (explanation,) = explain_batch(ensemble, torch.from_numpy(synthetic_batch(1, seed=4)))
    top = max(ensemble.architectures, key=lambda arch: explanation.probabilities[arch])
    np.testing.assert_array_equal(explanation.maps[ENSEMBLE_KEY], explanation.maps[top])


# --- faithfulness ----------------------------------------------------------------------------------
# A small CNN (the four architectures take too long to train on 2 cores) learns that a bright blob
# means COVID; it is then prepared as the worker prepares networks (BatchNorm folded by torch.fx,
# channels_last) and explained through the same code path, at its pooling layer's input as the
# ResNets are. The peak must lie within the blob (2 px of slack for the 4 px feature-map cells).

IMAGE_SIZE = 112  # half the networks' input: four times less to train; maps still come out 224x224
BLOB_RADIUS = 6
NOISE = 20


def _blob_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [count,3,112,112] noisy gray images, half with a bright blob; labels and blob centres."""
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.normal(90, NOISE, (count, size, size))
    labels = np.arange(count) % 2
    centres = rng.integers(BLOB_RADIUS + 4, size - BLOB_RADIUS - 4, (count, 2))
    for i in np.flatnonzero(labels):
        x, y = centres[i]
        images[i][(xx - x) ** 2 + (yy - y) ** 2 <= BLOB_RADIUS**2] += 120
    images = np.clip(images, 0, 255).astype(np.uint8)
    return np.repeat(images[:, None], 3, axis=1), labels, centres


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2),  # a receptive field wider than the blob
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)  # a detector's head: is the blob anywhere?
        self.fc = nn.Linear(16, 2)
        # Opposite weights for the two classes stay opposite in training (softmax's two gradients are
        # too), so the COVID logit carries all the evidence; an unrelated random row for it would add
        # its own noise to the COVID class's map, which a few steps of training do not outweigh.
        with torch.no_grad():
            self.fc.weight[0] = -self.fc.weight[1]
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_the_map_peaks_on_the_blob_that_decides_the_class() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SmallCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        images, labels, _ = _blob_images(32, rng)
        loss = nn.functional.cross_entropy(
            model(normalize(torch.from_numpy(images))), torch.from_numpy(labels)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    prepared = prepare_network(model.eval(), torch.device("cpu"))
    images, labels, centres = _blob_images(80, rng)
    inputs = normalize(torch.from_numpy(images))
    maps, probabilities = gradcam_at(prepared, prepared.get_submodule("pool"), inputs, at_input=True)
    assert ((probabilities >= 0.5) == labels.astype(bool)).mean() >= 0.95  # it learnt the task
    hits = []
    scale = INPUT_SIZE / IMAGE_SIZE
    for heat, (x, y) in zip(maps[labels == 1], centres[labels == 1], strict=True):
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(np.hypot(peak_x / scale - x, peak_y / scale - y) <= BLOB_RADIUS + 2)
    assert np.mean(hits) >= 0.9, f"the peak was on the blob in {np.mean(hits):.0%} of images"


def test_maps_from_the_scoring_pass_equal_captum_s_grad_cam(full_ensemble: Ensemble) -> None:
    """The closed-form gradient behind each network's head gives captum's LayerGradCam maps."""
    from deepcovid.explain import gradcam

    batch = torch.from_numpy(synthetic_batch(3, seed=11))
    explanations = explain_batch(full_ensemble, batch)
    inputs = full_ensemble._prepare(batch)
    for arch in full_ensemble.architectures:
        reference, probabilities = gradcam(
            full_ensemble.networks[arch], arch, inputs, temperature=full_ensemble.temperatures[arch]
        )
        for i, explanation in enumerate(explanations):
            np.testing.assert_allclose(explanation.maps[arch], reference[i], atol=2e-4, err_msg=arch)
            assert explanation.probabilities[arch] == pytest.approx(probabilities[i], abs=1e-6)


def test_the_explained_probability_is_the_scored_one_exactly(tiny_ensemble: Ensemble) -> None:
    from deepcovid.explain import explain_scored

    batch = torch.from_numpy(synthetic_batch(4, seed=12))
    scored = tiny_ensemble.score(batch, keep_activations=True)
    (explanation,) = explain_scored(tiny_ensemble, scored, [2])
    fields = scored.result_fields(2)
    assert explanation.probabilities[ENSEMBLE_KEY] == fields["ensemble_score"]
    for arch, probability in fields["probabilities"].items():
        assert explanation.probabilities[arch] == probability
