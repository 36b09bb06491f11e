"""The four Deep-COVID networks: torchvision backbones with a two-class head.

Class order is fixed here and recorded in every bundle: index 0 is non-COVID, index 1 is COVID.
ImageNet weights are only ever read from local files (torch hub cache, a configured directory or an
explicit path); this module never downloads anything. torch is imported inside functions so that
reading bundle manifests and ``deepcovid --help`` stay cheap.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union
from urllib.parse import urlparse

from deepcovid.settings import Settings, get_settings

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")
CLASSES: tuple[str, ...] = ("non_covid", "covid")
COVID_INDEX = 1
NUM_CLASSES = len(CLASSES)

# The ImageNet weights each network starts from: torchvision's original release, as in the paper (2020).
IMAGENET_WEIGHTS: dict[str, str] = {arch: "IMAGENET1K_V1" for arch in ARCHITECTURES}

# The attribute holding each network's classification head (the only part fine-tuned).
HEAD_MODULE: dict[str, str] = {
    "resnet18": "fc",
    "resnet50": "fc",
    "squeezenet1_1": "classifier",
    "densenet121": "classifier",
}

log = logging.getLogger(__name__)

Pretrained = Union[Literal["none", "imagenet"], Path, str]

# Old torchvision DenseNet checkpoints name layers "norm.1"; current modules are "norm1".
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but no usable local file holds them (we never download)."""


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def imagenet_weights_url(arch: str) -> str:
    """Where torchvision publishes this network's ImageNet checkpoint."""
    from torchvision.models import get_model_weights

    _check_arch(arch)
    return get_model_weights(arch)[IMAGENET_WEIGHTS[arch]].url


def imagenet_weights_filename(arch: str) -> str:
    """The checkpoint's file name, as torch hub stores it (e.g. ``resnet18-f37072fd.pth``)."""
    return os.path.basename(urlparse(imagenet_weights_url(arch)).path)


def imagenet_weights_candidates(arch: str, settings: Settings | None = None) -> list[Path]:
    """The local files checked, in order, for this network's ImageNet weights."""
    import torch

    settings = settings or get_settings()
    filename = imagenet_weights_filename(arch)
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename]
    if settings.imagenet_weights_dir is not None:
        candidates.append(Path(settings.imagenet_weights_dir) / filename)
    return candidates


def _missing_weights_message(arch: str, looked_in: list[Path]) -> str:
    import torch

    filename = imagenet_weights_filename(arch)
    places = "\n".join(f"  - {path}" for path in looked_in)
    return (
        f"ImageNet weights for {arch} are not available offline: no file {filename!r} was found in\n"
        f"{places}\n"
        f"Fetch {imagenet_weights_url(arch)} on a machine with internet access and put it in the torch hub "
        f"cache ({Path(torch.hub.get_dir()) / 'checkpoints'}) or in the directory named by "
        f"DEEPCOVID_IMAGENET_WEIGHTS_DIR, or pass the file (or its directory) explicitly, "
        f"or use --pretrained none for random initial weights."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without executing code: safetensors, or torch.load(weights_only=True)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file gets the same actionable error
        raise PretrainedWeightsUnavailable(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsUnavailable(f"weights file {path} does not hold a plain state dict of tensors")
    return dict(state)


def locate_weights(arch: str, pretrained: Pretrained, settings: Settings | None = None) -> Path:
    """The local checkpoint ``build_network`` would read, or ``PretrainedWeightsUnavailable``."""
    if isinstance(pretrained, str) and pretrained == "imagenet":
        candidates = imagenet_weights_candidates(arch, settings)
    else:
        path = Path(pretrained)
        candidates = [path / imagenet_weights_filename(arch)] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PretrainedWeightsUnavailable(_missing_weights_message(arch, candidates))


def _new_backbone(arch: str) -> nn.Module:
    """The torchvision network with its ImageNet (1000-class) head and random weights."""
    from torchvision import models

    return getattr(models, arch)(weights=None)


# Networks whose torchvision head ends in a ReLU before pooling: SqueezeNet's clamps every logit at 0,
# so a head trained from scratch can die (both outputs 0 for every image). Bundles written before the
# fix record it (``head_relu`` in the manifest) and are rebuilt with it, so their scores stay the same.
RELU_HEAD_ARCHITECTURES: tuple[str, ...] = ("squeezenet1_1",)


def replace_head(model: nn.Module, arch: str, *, head_relu: bool = False) -> None:
    """Swap the ImageNet head for a freshly initialised two-class one (``head_relu``: keep SqueezeNet's
    final ReLU, as bundles trained before it was dropped need)."""
    from torch import nn

    if arch in ("resnet18", "resnet50"):
        model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    elif arch == "densenet121":
        model.classifier = nn.Linear(model.classifier.in_features, NUM_CLASSES)
    elif arch == "squeezenet1_1":
        # torchvision's Dropout -> 1x1 conv -> ReLU -> global average pool: the conv is new, and the ReLU
        # becomes an Identity (same indices, so weight names are unchanged) unless asked to stay.
        old = model.classifier[1]
        conv = nn.Conv2d(old.in_channels, NUM_CLASSES, kernel_size=1)
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)  # torchvision's init for this layer
        nn.init.constant_(conv.bias, 0.0)
        model.classifier[1] = conv
        model.classifier[2] = nn.ReLU(inplace=True) if head_relu else nn.Identity()
        model.num_classes = NUM_CLASSES
    else:  # pragma: no cover - guarded by _check_arch
        raise ValueError(arch)


def has_head_relu(model: nn.Module, arch: str) -> bool:
    """Whether this network's head ends in a ReLU (SqueezeNet built with ``head_relu``)."""
    from torch import nn

    return arch in RELU_HEAD_ARCHITECTURES and isinstance(head_module(model, arch)[2], nn.ReLU)


def _head_out_features(state: Mapping[str, torch.Tensor], arch: str) -> int | None:
    key = {"resnet18": "fc.weight", "resnet50": "fc.weight", "densenet121": "classifier.weight"}.get(
        arch, "classifier.1.weight"
    )
    weight = state.get(key)
    return None if weight is None else int(weight.shape[0])


def _load_into(model: nn.Module, arch: str, state: dict[str, torch.Tensor], source: Path) -> None:
    if arch == "densenet121":
        for key in list(state):
            match = _DENSENET_OLD_KEY.match(key)
            if match:
                state[match.group(1) + match.group(2)] = state.pop(key)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsUnavailable(f"weights file {source} does not fit {arch}: {exc}") from exc


def build_network(
    arch: str, pretrained: Pretrained = "none", *, settings: Settings | None = None, head_relu: bool = False
) -> nn.Module:
    """Build ``arch`` with a two-class head.

    ``pretrained``: ``"none"`` (random initial weights, only when asked for), ``"imagenet"`` (torch hub
    cache, then ``Settings.imagenet_weights_dir``) or a path to a checkpoint file or a directory holding
    torchvision's checkpoint file. A checkpoint may hold the ImageNet head (replaced after loading) or
    already a two-class head (kept). Raises ``PretrainedWeightsUnavailable`` rather than downloading.
    ``head_relu`` keeps SqueezeNet's final ReLU (see ``RELU_HEAD_ARCHITECTURES``); only old bundles ask.
    """
    _check_arch(arch)
    model = _new_backbone(arch)
    if isinstance(pretrained, str) and pretrained == "none":
        replace_head(model, arch, head_relu=head_relu)
        return model
    source = locate_weights(arch, pretrained, settings)
    state = _read_state_dict(source)
    if _head_out_features(state, arch) == NUM_CLASSES:
        replace_head(model, arch, head_relu=head_relu)
        _load_into(model, arch, state, source)
    else:
        _load_into(model, arch, state, source)
        replace_head(model, arch, head_relu=head_relu)
    return model


def head_module(model: nn.Module, arch: str) -> nn.Module:
    _check_arch(arch)
    return getattr(model, HEAD_MODULE[arch])


def head_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """The parameters the paper fine-tunes: the final layer only."""
    return list(head_module(model, arch).parameters())


def freeze_backbone(model: nn.Module, arch: str) -> None:
    """Stop gradients everywhere except the head (the paper's transfer-learning setting)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in head_parameters(model, arch):
        parameter.requires_grad_(True)


def set_train_mode(model: nn.Module, arch: str, *, frozen_backbone: bool = True) -> None:
    """Put the model in training mode for fine-tuning.

    With a frozen backbone its BatchNorm layers stay in eval mode, so their ImageNet running statistics
    are not drifted by training batches; only the head (and SqueezeNet's head dropout) trains.
    """
    model.train()
    if frozen_backbone:
        head = head_module(model, arch)
        for child in model.children():
            if child is not head:
                child.eval()


def prepare_network(model: nn.Module, device: torch.device) -> nn.Module:
    """A network as workers run it: eval mode, BatchNorm folded, channels_last on ``device``, no grads."""
    import torch

    model = fold_batchnorm(model.eval())
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model.requires_grad_(False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution.

    One operation instead of two per layer at inference (all of a ResNet's BatchNorms; DenseNet's
    stem only, its other norms precede their convolutions). A model in training mode, without
    BatchNorm, or that torch.fx cannot trace is returned as it is.
    """
    from torch import nn

    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model, inplace=False).eval()
    except Exception as exc:  # tracing is best effort: the unfolded model scores the same, only slower
        log.warning("BatchNorm not folded for %s (%s): scoring unfolded", type(model).__name__, exc)
        return model
