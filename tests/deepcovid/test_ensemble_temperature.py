"""Temperatures in bundles: stored in the manifest, applied by the Ensemble before its thresholds, and
bundles of format 1 (no temperature, SqueezeNet with its final ReLU) still loading and scoring as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepcovid.batches import normalize
from deepcovid.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    compute_bundle_id,
    load_bundle,
    load_networks,
    save_bundle,
)
from deepcovid.ensemble import Ensemble
from deepcovid.networks import COVID_INDEX, build_network
from tests.fixtures.images import synthetic_batch

CREATED = "2024-01-01T00:00:00+00:00"
TEMPERATURES = {"squeezenet1_1": 2.5, "resnet18": 0.7}


@pytest.fixture(scope="module")
def networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {arch: build_network(arch, "none").eval() for arch in TEMPERATURES}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.from_numpy(synthetic_batch(3, 0))


def _manual(model: nn.Module, batch: torch.Tensor, temperature: float) -> np.ndarray:
    with torch.inference_mode():
        logits = model.eval()(normalize(batch)).double()
    return torch.softmax(logits / temperature, dim=1)[:, COVID_INDEX].numpy()


def _as_format_1(bundle: Bundle, out: Path) -> Path:
    """The bundle as a deepcovid of format 1 wrote it: no temperature, no head_relu."""
    path = Path(shutil.copytree(bundle.path, out))
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["temperature"], manifest["head_relu"]
    manifest["format_version"] = 1
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_the_ensemble_scores_softmax_of_logits_over_temperature(
    tmp_path: Path, networks: dict[str, nn.Module], batch: torch.Tensor
) -> None:
    bundle = save_bundle(tmp_path / "b", networks, temperatures=TEMPERATURES, created_at=CREATED)
    assert bundle.temperatures == TEMPERATURES
    assert json.loads((bundle.path / MANIFEST).read_text())["temperature"] == TEMPERATURES
    ensemble = Ensemble.from_bundle(bundle, device="cpu", precision="fp32")
    scored = ensemble.score(batch)
    for arch, temperature in TEMPERATURES.items():
        expected = _manual(networks[arch], batch, temperature)
        np.testing.assert_allclose(scored.probabilities[arch], expected, atol=1e-5)
        assert not np.allclose(expected, _manual(networks[arch], batch, 1.0), atol=1e-4)
        assert scored.decisions[arch].tolist() == (expected >= ensemble.thresholds[arch]).tolist()
    other = save_bundle(tmp_path / "t1", networks, created_at=CREATED)
    assert other.bundle_id != bundle.bundle_id  # the temperature is part of what the id pins


def test_a_format_1_manifest_loads_with_temperature_one_and_the_relu_head(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    """A bundle trained before the fix: its SqueezeNet is rebuilt with the final ReLU, so it scores
    exactly what it scored then (negative logits clamped at 0)."""
    torch.manual_seed(1)
    old = build_network("squeezenet1_1", "none", head_relu=True).eval()
    with torch.no_grad():
        old.classifier[1].bias.copy_(torch.tensor([0.3, -5.0]))  # the COVID logit is clamped at 0
    saved = save_bundle(tmp_path / "v2", {"squeezenet1_1": old}, created_at=CREATED)
    assert saved.head_relu == ("squeezenet1_1",)
    bundle = load_bundle(_as_format_1(saved, tmp_path / "v1"))
    assert bundle.manifest["format_version"] == 1
    assert bundle.temperatures == {"squeezenet1_1": 1.0}
    assert bundle.head_relu == ("squeezenet1_1",)
    loaded = load_networks(bundle)["squeezenet1_1"]
    assert isinstance(loaded.classifier[2], nn.ReLU)
    scored = Ensemble.from_bundle(bundle, device="cpu", precision="fp32").score(batch)
    np.testing.assert_allclose(scored.probabilities["squeezenet1_1"], _manual(old, batch, 1.0), atol=1e-6)


def test_new_squeezenet_bundles_load_without_the_relu(tmp_path: Path, networks: dict[str, nn.Module]) -> None:
    bundle = save_bundle(tmp_path / "b", {"squeezenet1_1": networks["squeezenet1_1"]}, created_at=CREATED)
    assert bundle.head_relu == ()
    assert isinstance(load_networks(bundle)["squeezenet1_1"].classifier[2], nn.Identity)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_temperatures_must_be_positive(
    tmp_path: Path, networks: dict[str, nn.Module], temperature: float
) -> None:
    net = {"squeezenet1_1": networks["squeezenet1_1"]}
    with pytest.raises(BundleError, match="temperature"):
        save_bundle(tmp_path / "b", net, temperatures={"squeezenet1_1": temperature})
    with pytest.raises(BundleError, match="not in the bundle"):
        save_bundle(tmp_path / "c", net, temperatures={"resnet50": 2.0})


@pytest.mark.parametrize("edit", ["drop", "zero", "string"])
def test_a_format_2_manifest_must_state_its_temperatures(
    tmp_path: Path, networks: dict[str, nn.Module], edit: str
) -> None:
    bundle = save_bundle(tmp_path / "b", {"squeezenet1_1": networks["squeezenet1_1"]}, created_at=CREATED)
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    if edit == "drop":
        del manifest["temperature"]
    else:
        manifest["temperature"]["squeezenet1_1"] = 0 if edit == "zero" else "2"
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (bundle.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="temperature"):
        load_bundle(bundle.path)
