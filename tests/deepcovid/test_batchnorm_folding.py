"""Folding BatchNorm into convolutions at load time must not change what the ensemble says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepcovid.batches import normalize
from deepcovid.bundle import load_networks, save_bundle
from deepcovid.ensemble import Ensemble
from deepcovid.networks import COVID_INDEX, build_network, fold_batchnorm

FOLD_TOLERANCE = 1e-4


def _with_trained_looking_batchnorm(arch: str, seed: int) -> nn.Module:
    """Random weights plus non-trivial BatchNorm statistics (fresh ones would make folding a no-op)."""
    torch.manual_seed(seed)
    model = build_network(arch, "none")
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return model


def _batch(count: int) -> torch.Tensor:
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:224, 0:224] / 223.0
    images = []
    for _ in range(count):
        a, b = rng.uniform(0.2, 1.0, 2)
        gray = np.clip(0.5 + 0.3 * np.sin(6 * a * xx + 3 * b * yy) + rng.normal(0, 0.05, xx.shape), 0, 1)
        images.append(np.repeat((gray * 255).astype(np.uint8)[None], 3, axis=0))
    return torch.from_numpy(np.stack(images))


@pytest.mark.slow
def test_folded_ensemble_gives_the_unfolded_probabilities(tmp_path: Path) -> None:
    archs = ("resnet18", "densenet121", "squeezenet1_1")
    networks = {arch: _with_trained_looking_batchnorm(arch, i) for i, arch in enumerate(archs)}
    bundle = save_bundle(tmp_path / "bundle", networks)
    ensemble = Ensemble.from_bundle(bundle, device="cpu", precision="fp32")

    resnet = ensemble.networks["resnet18"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()), "ResNet BatchNorm not folded"
    assert not resnet.training and not any(p.requires_grad for p in resnet.parameters())

    batch = _batch(3)
    folded = ensemble.probabilities(batch)
    with torch.inference_mode():
        inputs = normalize(batch)
        for arch, model in load_networks(bundle).items():
            expected = torch.softmax(model.eval()(inputs), dim=1)[:, COVID_INDEX].double().numpy()
            assert np.abs(folded[arch] - expected).max() < FOLD_TOLERANCE, arch


def test_models_without_batchnorm_or_in_training_are_left_alone() -> None:
    squeezenet = build_network("squeezenet1_1", "none").eval()
    assert fold_batchnorm(squeezenet) is squeezenet
    training = build_network("resnet18", "none").train()
    assert fold_batchnorm(training) is training
