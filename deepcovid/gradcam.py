"""Grad-CAM at each network's last convolutional block, from the scoring pass: which layer, keeping its
activations while the ensemble scores, and the maps in closed form (the reasoning is in
``deepcovid.explain``'s doc). Apart from ``deepcovid.explain`` so the ensemble can keep activations
without importing what explains it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from deepcovid.networks import COVID_INDEX
from deepcovid.preprocess import INPUT_SIZE

# arch -> (module path, whether the map is taken at that module's input rather than its output)
GRADCAM_LAYERS: dict[str, tuple[str, bool]] = {
    "resnet18": ("avgpool", True),
    "resnet50": ("avgpool", True),
    "densenet121": ("features.norm5", False),
    "squeezenet1_1": ("classifier.0", True),
}

# arch -> (module path of the head behind the layer, its kind; see deepcovid.explain's doc)
HEADS: dict[str, tuple[str, str]] = {
    "resnet18": ("fc", "linear"),
    "resnet50": ("fc", "linear"),
    "densenet121": ("classifier", "relu_linear"),
    "squeezenet1_1": ("classifier.1", "conv_relu"),
}


@contextlib.contextmanager
def capture_layer(model: torch.nn.Module, arch: str, into: dict[str, torch.Tensor]) -> Iterator[None]:
    """Keep ``model``'s activations at its Grad-CAM layer in ``into[arch]`` while the block runs."""
    name, at_input = GRADCAM_LAYERS[arch]

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # A copy of an output: DenseNet applies its ReLU in place right after norm5.
        into[arch] = args[0] if at_input else output.clone()

    handle = model.get_submodule(name).register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def gradcam_from_activations(model: torch.nn.Module, arch: str, activations: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps ``[B,224,224]`` (each scaled to [0, 1]) for the COVID class from the layer's
    activations ``[B,C,h,w]``, with the gradient in closed form (see the module doc)."""
    name, kind = HEADS[arch]
    head = model.get_submodule(name)
    acts = activations.detach().float()
    weight = head.weight.detach().float()[COVID_INDEX].reshape(1, -1)  # [1, C]
    if kind == "linear":  # logit = W . mean(A): dlogit/dA = W / hw everywhere
        alpha = weight
    elif kind == "relu_linear":  # logit = W . mean(relu(A)): the gradient passes where A > 0
        alpha = weight * (acts > 0).float().mean(dim=(2, 3))
    else:  # conv_relu: logit = mean(relu(W . A + b)): it passes where the COVID channel is positive
        bias = head.bias.detach().float()[COVID_INDEX] if head.bias is not None else 0.0
        z = torch.einsum("bchw,c->bhw", acts, weight[0]) + bias
        alpha = weight * (z > 0).float().mean(dim=(1, 2))[:, None]
    cam = torch.einsum("bchw,bc->bhw", acts, alpha)[:, None]  # the common 1/hw only rescales
    return scaled_maps(cam)


def scaled_maps(cam: torch.Tensor) -> np.ndarray:
    """``[B,1,h,w]`` layer maps to ``[B,224,224]`` float32 in [0, 1]: ReLU, bilinear, divided by the peak."""
    cam = torch.nn.functional.interpolate(cam.float().clamp_min(0), (INPUT_SIZE, INPUT_SIZE), mode="bilinear")
    cam = cam[:, 0].clamp_min(0)
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (cam / peak[:, None, None]).to("cpu", dtype=torch.float32).numpy()
