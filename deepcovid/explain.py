"""Grad-CAM maps for the COVID class: one per network of a loaded ``Ensemble``, and one for the ensemble.

The maps come from the scoring forward pass itself: ``Ensemble.score(batch, keep_activations=True)``
keeps each network's activations at its Grad-CAM layer, and ``explain_scored`` turns them into maps. So
they come from the networks exactly as scoring runs them (BatchNorm folded, channels_last, the
ensemble's autocast precision), and the probability a map explains *is* the probability stored.

No backward pass is needed: behind each Grad-CAM layer the four networks have a fixed head (global
average pooling and a linear layer; a ReLU before it in DenseNet, a 1x1 convolution and ReLU before the
pooling in SqueezeNet), so the gradient of the COVID logit with respect to the layer's activations has a
closed form, and Grad-CAM's channel weights (the spatial mean of that gradient) follow from the weights
of the head. A test checks these maps against captum's ``LayerGradCam`` on all four networks. Measured on
this shared 2-core CPU (benchmarks/heatmaps.py, docs/performance.md), captum's backward pass made a map
cost about a scoring forward pass per network; the closed form costs almost nothing, which is what lets
maps for flagged images stay within 10% of the throughput without them.

captum's ``LayerGradCam`` (``gradcam``, ``gradcam_at``) stays as the reference and for networks outside
the table: the tests' faithfulness check trains a small CNN and explains it with captum. Chosen over
pytorch-grad-cam: measured per image on this CPU (random weights, fp32, channels_last, mean of 5 after a
warm-up), captum / pytorch-grad-cam in ms, two runs: resnet18 63 / 128 and 457 / 967, resnet50 526 / 265
and 1132 / 3002, densenet121 188 / 363 and 4605 / 4418, squeezenet1_1 22 / 43 and 12 / 26 (other jobs
shared the cores: the runs disagree, the ratio mostly does not). Captum was faster in 6 of 8: it
backpropagates only from the output to the hooked layer, pytorch-grad-cam through the whole network to
the input; it is also lighter (pytorch-grad-cam pulls in opencv).

Layers (the last convolutional block; hooked on a module the folded ``torch.fx`` graph still calls):
- resnet18/50: ``layer4``'s output, as the input of ``avgpool`` (``layer4`` itself is not called as a
  module once torch.fx has folded BatchNorm).
- densenet121: ``features`` after ``norm5``, the output of ``features.norm5``.
- squeezenet1_1: the last Fire module ``features[-1]`` (512 channels, 13x13), as the input of the
  classifier's dropout. Not the classifier's final 1x1 conv: it has one channel per class, where
  Grad-CAM reduces to the COVID channel's own activation and loses what 512 channels tell apart.

The ensemble map: each network's map (ReLU, upsampled bilinearly to 224x224) divided by its maximum,
then averaged with the policy's weights: ``mean`` and ``majority`` weigh every network equally (as
their scores do), ``any`` puts all weight on the network(s) giving the highest probability (its score).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from deepcovid.batches import collate
from deepcovid.decode import decode
from deepcovid.ensemble import Ensemble, ScoreBatch
from deepcovid.gradcam import GRADCAM_LAYERS, gradcam_from_activations, scaled_maps
from deepcovid.networks import COVID_INDEX
from deepcovid.preprocess import INPUT_SIZE, crop_box, load_image
from deepcovid.results import ENSEMBLE_KEY


@dataclass(frozen=True)
class CropGeometry:
    """Where a 224x224 map lies on the original image as displayed (EXIF-rotated, MONOCHROME1 inverted)."""

    width: int
    height: int
    scale: float  # resized / original, the shorter side brought to 224
    box: tuple[float, float, float, float]  # (left, top, right, bottom) of the crop, original pixels

    @classmethod
    def for_size(cls, width: int, height: int) -> CropGeometry:
        return cls(width, height, INPUT_SIZE / min(width, height), crop_box(width, height))

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """A point of the 224x224 map (pixel units) in original-image pixels."""
        left, top, right, bottom = self.box
        return left + x * (right - left) / INPUT_SIZE, top + y * (bottom - top) / INPUT_SIZE

    def as_dict(self) -> dict[str, object]:
        return {"width": self.width, "height": self.height, "scale": self.scale, "box": list(self.box)}


@dataclass
class Explanation:
    """The maps of one image (float32 224x224 in [0, 1]) and the probability each explains; keyed by
    architecture and by ``ENSEMBLE_KEY``."""

    maps: dict[str, np.ndarray]
    probabilities: dict[str, float]


def gradcam(
    model: torch.nn.Module,
    arch: str,
    inputs: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``[B,224,224]`` (each scaled to [0, 1]) for the COVID class, and the COVID
    probabilities ``[B]`` of the same forward pass, calibrated with the network's ``temperature`` as the
    Ensemble scores them. ``inputs`` are normalised, on the model's device."""
    name, at_input = GRADCAM_LAYERS[arch]
    return gradcam_at(model, model.get_submodule(name), inputs, at_input, autocast_dtype, temperature)


def gradcam_at(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    inputs: torch.Tensor,
    at_input: bool = False,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``gradcam`` at any layer: the one code path the four networks and the tests' small CNN share.

    The temperature divides the logits for the probability only: it scales the COVID logit's gradients
    uniformly, so the map, scaled to [0, 1], is the same."""
    from captum.attr import LayerGradCam

    outputs: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        outputs.append(out)
        return out

    autocast = (
        torch.autocast(device_type=inputs.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(False), torch.enable_grad(), autocast:
        cam = LayerGradCam(forward, layer).attribute(
            inputs, target=COVID_INDEX, relu_attributions=True, attribute_to_layer_input=at_input
        )
    maps = scaled_maps(cam.detach())
    covid = torch.softmax(outputs[-1].detach().float() / temperature, dim=1)[:, COVID_INDEX]
    return maps, covid.to("cpu", dtype=torch.float64).numpy()


def policy_weights(policy: str, probabilities: Mapping[str, float]) -> dict[str, float]:
    """Each network's weight in the ensemble map of one image (see the module doc)."""
    archs = list(probabilities)
    if policy == "any":
        best = max(probabilities.values())
        top = [a for a in archs if probabilities[a] == best]
        return {a: (1.0 / len(top) if a in top else 0.0) for a in archs}
    return {a: 1.0 / len(archs) for a in archs}


def explain_batch(ensemble: Ensemble, batch: torch.Tensor | np.ndarray) -> list[Explanation]:
    """Maps and explained probabilities for every image of a uint8 ``[B,3,224,224]`` batch (by the torch
    networks: an int8 ensemble's maps come from its ``explainer``)."""
    ensemble = ensemble.explainer
    scored = ensemble.score(torch.as_tensor(batch), keep_activations=True)
    return explain_scored(ensemble, scored, range(len(scored)))


def explain_scored(ensemble: Ensemble, scored: ScoreBatch, indices: Sequence[int]) -> list[Explanation]:
    """The maps of images ``indices`` of a batch scored with ``keep_activations``: each explains the
    probabilities that batch gave it."""
    if not indices:
        return []
    chosen = torch.as_tensor(list(indices), dtype=torch.long)
    per_arch = {
        arch: gradcam_from_activations(
            ensemble.networks[arch],
            arch,
            scored.activations[arch].index_select(0, chosen.to(ensemble.device)),
        )
        for arch in ensemble.architectures
    }
    explanations = []
    for row, i in enumerate(indices):
        probs = {arch: float(scored.probabilities[arch][i]) for arch in ensemble.architectures}
        weights = policy_weights(ensemble.policy, probs)
        maps = {arch: per_arch[arch][row] for arch in ensemble.architectures}
        combined = sum(weights[arch] * maps[arch] for arch in ensemble.architectures)
        maps[ENSEMBLE_KEY] = np.asarray(combined, dtype=np.float32)
        probs[ENSEMBLE_KEY] = float(scored.ensemble_score[i])
        explanations.append(Explanation(maps, probs))
    return explanations


@dataclass
class ExplainedImage:
    """One file's explanation, where it lies on the image, and the image as displayed (uint8)."""

    explanation: Explanation
    geometry: CropGeometry
    pixels: np.ndarray


def explain_bytes(ensemble: Ensemble, data: bytes, *, name: str = "") -> ExplainedImage:
    """Explain one image file; raises only ``DecodeError``.

    The networks get exactly the pipeline's input (``load_image``); the image is decoded a second
    time at full size (EXIF-rotated, MONOCHROME1 inverted) for drawing the map on.
    """
    model_input, _ = load_image(data, name=name)
    shown = decode(data, name=name)
    height, width = shown.pixels.shape[:2]
    (explanation,) = explain_batch(ensemble, collate([model_input]))
    return ExplainedImage(explanation, CropGeometry.for_size(width, height), shown.pixels)
