"""The four networks: two-class heads, frozen backbones, ImageNet weights from local files only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepcovid.networks import (
    ARCHITECTURES,
    CLASSES,
    COVID_INDEX,
    PretrainedWeightsUnavailable,
    build_network,
    freeze_backbone,
    head_parameters,
    imagenet_weights_filename,
    set_train_mode,
)
from deepcovid.settings import Settings


def test_class_order_is_fixed() -> None:
    assert CLASSES == ("non_covid", "covid")
    assert CLASSES[COVID_INDEX] == "covid"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_network_has_a_two_class_head(arch: str) -> None:
    torch.manual_seed(0)
    model = build_network(arch, "none").eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_freeze_leaves_only_the_head_trainable(arch: str) -> None:
    model = build_network(arch, "none")
    freeze_backbone(model, arch)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in head_parameters(model, arch)}
    assert trainable == head
    assert head  # weight and bias of the final layer
    assert sum(p.numel() for p in head_parameters(model, arch)) <= 2 * 2048 + 2  # features x 2 classes + bias


def test_frozen_backbone_keeps_batchnorm_statistics() -> None:
    model = build_network("resnet18", "none")
    freeze_backbone(model, "resnet18")
    set_train_mode(model, "resnet18")
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(before, model.bn1.running_mean)
    assert model.fc.training and not model.layer1.training


def test_set_train_mode_trains_squeezenet_head_dropout() -> None:
    model = build_network("squeezenet1_1", "none")
    set_train_mode(model, "squeezenet1_1")
    assert model.classifier.training and model.classifier[0].training
    assert not model.features.training


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("vgg16", "none")


def _offline_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights_dir: Path | None) -> Settings:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return Settings(imagenet_weights_dir=weights_dir)


def test_missing_imagenet_weights_give_an_actionable_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _offline_settings(monkeypatch, tmp_path, tmp_path / "weights")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedWeightsUnavailable) as caught:
        build_network("resnet18", "imagenet", settings=settings)
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert str(tmp_path / "weights") in message
    assert "DEEPCOVID_IMAGENET_WEIGHTS_DIR" in message
    assert "--pretrained none" in message


def _imagenet_like_checkpoint(arch: str, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from torchvision import models

    torch.manual_seed(1)
    state = getattr(models, arch)(weights=None).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / imagenet_weights_filename(arch)
    torch.save(state, path)
    return path, state


def _assert_backbone_from(model: torch.nn.Module, state: dict[str, torch.Tensor], head_prefix: str) -> None:
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith(head_prefix)]
    assert backbone
    for key in backbone:
        assert torch.equal(loaded[key], state[key]), key
    assert loaded[f"{head_prefix}weight"].shape[0] == 2


def test_imagenet_weights_from_the_configured_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _offline_settings(monkeypatch, tmp_path, tmp_path / "weights")
    _, state = _imagenet_like_checkpoint("resnet18", tmp_path / "weights")
    model = build_network("resnet18", "imagenet", settings=settings)
    _assert_backbone_from(model, state, "fc.")


def test_imagenet_weights_from_the_torch_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _offline_settings(monkeypatch, tmp_path, None)
    _, state = _imagenet_like_checkpoint("resnet18", tmp_path / "torch_home" / "hub" / "checkpoints")
    model = build_network("resnet18", "imagenet", settings=settings)
    _assert_backbone_from(model, state, "fc.")


def test_weights_from_an_explicit_file_or_directory(tmp_path: Path) -> None:
    path, state = _imagenet_like_checkpoint("squeezenet1_1", tmp_path / "w")
    for source in (path, tmp_path / "w"):
        model = build_network("squeezenet1_1", source)
        _assert_backbone_from(model, state, "classifier.1.")
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 2)


def test_old_style_densenet_checkpoint_keys_are_renamed(tmp_path: Path) -> None:
    from torchvision import models

    state = models.densenet121(weights=None).state_dict()
    old_style = {}
    for key, value in state.items():
        for part in ("norm", "relu", "conv"):
            for n in ("1", "2"):
                key = key.replace(f".{part}{n}.", f".{part}.{n}.") if "denselayer" in key else key
        old_style[key] = value
    assert any(".norm.1." in k for k in old_style)
    path = tmp_path / "densenet.pth"
    torch.save(old_style, path)
    model = build_network("densenet121", path)
    assert torch.equal(model.features.conv0.weight, state["features.conv0.weight"])


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path, _ = _imagenet_like_checkpoint("resnet18", tmp_path)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not fit resnet50"):
        build_network("resnet50", path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):  # noqa: ANN204 - a malicious payload
            return (Path("should-not-exist").touch, ())

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"fc.weight": Boom()}, handle)
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot read"):
        build_network("resnet18", path)
    assert not Path("should-not-exist").exists()


def _train_squeezenet_from_scratch(*, head_relu: bool) -> torch.Tensor:
    """Eight Adam steps at 1e-2 on 16 synthetic 48 px radiographs, from random weights; the eval-mode
    logits of those images after."""
    import numpy as np

    from deepcovid.batches import normalize
    from training.synthetic import make_xray

    images = np.stack([make_xray(48, opacity=i % 2 == 0, seed=i) for i in range(16)])
    inputs = normalize(torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1))
    labels = torch.tensor([1 - i % 2 for i in range(16)])
    torch.manual_seed(0)
    model = build_network("squeezenet1_1", "none", head_relu=head_relu)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.inference_mode():
        return model.eval()(inputs)


def test_squeezenet_trained_from_scratch_keeps_its_outputs_alive() -> None:
    """torchvision's head ends in a ReLU: once the 1x1 conv goes negative everywhere, both logits are 0
    for every image and no gradient brings them back (shown with ``head_relu=True``). Without it the
    outputs stay alive and tell the images apart."""
    dead = _train_squeezenet_from_scratch(head_relu=True)
    assert torch.count_nonzero(dead) == 0  # the collapse, as bundles trained before the fix could suffer

    alive = _train_squeezenet_from_scratch(head_relu=False)
    assert torch.count_nonzero(alive) == alive.numel()
    margin = alive[:, COVID_INDEX] - alive[:, 1 - COVID_INDEX]
    assert float(margin.max() - margin.min()) > 1e-3  # not one answer for every image


def test_only_squeezenet_built_with_head_relu_keeps_it() -> None:
    from torch import nn

    from deepcovid.networks import has_head_relu

    assert isinstance(build_network("squeezenet1_1", "none").classifier[2], nn.Identity)
    assert not has_head_relu(build_network("squeezenet1_1", "none"), "squeezenet1_1")
    assert has_head_relu(build_network("squeezenet1_1", "none", head_relu=True), "squeezenet1_1")
    assert not has_head_relu(build_network("resnet18", "none", head_relu=True), "resnet18")
