"""Which precision scores: fp32, or bf16 on CPU only where training measured it safe for the bundle.

bf16 on CPU needs bf16 instructions (elsewhere oneDNN emulates it, slower than fp32) and a bundle whose
training recorded, on validation images, that bf16 moves no COVID probability by more than the tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from deepcovid.batches import normalize
from deepcovid.bundle import Bundle
from deepcovid.cpu import cpu_has_native_bf16
from deepcovid.networks import COVID_INDEX
from deepcovid.settings import Settings

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

BF16_CHECK_KEY = "bf16_max_abs_diff"  # in a bundle's validation metrics: per network, measured by `train`


def validated_bf16_drift(bundle: Bundle) -> float | None:
    """The largest bf16-vs-fp32 change of a COVID probability that training measured on this bundle's
    validation images (any network), or None when the bundle carries no such check."""
    recorded = bundle.metrics.get("validation", {}).get(BF16_CHECK_KEY)
    if not isinstance(recorded, dict) or any(arch not in recorded for arch in bundle.architectures):
        return None
    return max(float(recorded[arch]) for arch in bundle.architectures)


def autocast_dtype(
    device: torch.device, precision: str, settings: Settings, bundle: Bundle | None = None
) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. On CPU ``auto`` follows ``settings.cpu_bf16``: in its
    ``auto`` mode bf16 needs bf16 instructions and a bundle validated in bf16 within the tolerance."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ValueError("fp16 is only supported on CUDA; use fp32 or bf16 on CPU")
    if precision == "bf16" or settings.cpu_bf16 == "on":
        return torch.bfloat16
    if settings.cpu_bf16 == "off" or not cpu_has_native_bf16():
        return None
    drift = validated_bf16_drift(bundle) if bundle is not None else None
    if drift is None:
        log.info("scoring in fp32: the bundle records no bf16 check on validation images")
        return None
    if drift > settings.bf16_tolerance:
        log.info(
            "scoring in fp32: bf16 moved validation probabilities by up to %.4f (tolerance %.4f)",
            drift,
            settings.bf16_tolerance,
        )
        return None
    log.info("scoring in bf16: validated within %.4f of fp32 on the bundle's validation images", drift)
    return torch.bfloat16


def precision_drift(
    networks: Mapping[str, nn.Module],
    images: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int = 32,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per network, the largest |autocast(dtype) - fp32| COVID probability over uint8 ``images``
    (``networks`` as ``prepare_network`` makes them and ``temperatures`` as the bundle's, to measure
    what workers will run)."""
    worst = dict.fromkeys(networks, 0.0)
    temperatures = temperatures or {}
    with torch.inference_mode():
        for start in range(0, int(images.shape[0]), batch_size):
            inputs = normalize(images[start : start + batch_size].to(device))  # as Ensemble._prepare does
            for arch, model in networks.items():
                t = float(temperatures.get(arch, 1.0))
                exact = torch.softmax(model(inputs).float() / t, dim=1)[:, COVID_INDEX]
                with torch.autocast(device_type=device.type, dtype=dtype):
                    fast = torch.softmax(model(inputs).float() / t, dim=1)[:, COVID_INDEX]
                worst[arch] = max(worst[arch], float((fast - exact).abs().max()))
    return worst
