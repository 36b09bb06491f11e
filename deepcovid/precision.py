"""Which precision scores: fp32, or bf16/int8 on CPU only where training measured it safe for the bundle.

bf16 on CPU needs bf16 instructions (elsewhere oneDNN emulates it, slower than fp32) and a bundle whose
training recorded, on validation images, that bf16 moves no COVID probability by more than the tolerance.
int8 needs the optional OpenVINO engine and a bundle carrying int8 networks whose recorded drift is within
the int8 tolerance and whose validation AUCs moved by at most ``defaults.INT8_AUC_CHANGE``; otherwise
workers fall back to bf16/fp32 as above and log why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from deepcovid import defaults
from deepcovid.batches import normalize
from deepcovid.bundle import Bundle
from deepcovid.cpu import cpu_has_native_bf16
from deepcovid.int8 import engine_missing
from deepcovid.manifest import INT8_KEY
from deepcovid.networks import COVID_INDEX
from deepcovid.settings import Settings

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")

BF16_CHECK_KEY = "bf16_max_abs_diff"  # in a bundle's validation metrics: per network, measured by `train`


def validated_bf16_drift(bundle: Bundle) -> float | None:
    """The largest bf16-vs-fp32 change of a COVID probability that training measured on this bundle's
    validation images (any network), or None when the bundle carries no such check."""
    recorded = bundle.metrics.get("validation", {}).get(BF16_CHECK_KEY)
    if not isinstance(recorded, dict) or any(arch not in recorded for arch in bundle.architectures):
        return None
    return max(float(recorded[arch]) for arch in bundle.architectures)


def validated_int8_drift(bundle: Bundle) -> tuple[float, float] | None:
    """The largest |int8 - fp32| COVID probability and the largest |AUC change| that quantization measured
    on this bundle's validation images (any network), or None when the bundle carries no int8 networks."""
    networks = (bundle.manifest.get(INT8_KEY) or {}).get("networks") or {}
    if any(arch not in networks for arch in bundle.architectures):
        return None
    drift = max(float(networks[arch]["max_abs_diff"]) for arch in bundle.architectures)
    changes = [networks[arch].get("auc_change") for arch in bundle.architectures]
    # No AUC (one class among the validation images) proves nothing: treated as failing the gate.
    auc = max(abs(float(c)) if c is not None else float("inf") for c in changes)
    return drift, auc


def int8_refusal(device: torch.device, precision: str, settings: Settings, bundle: Bundle) -> str | None:
    """None when this ensemble scores in int8; otherwise why not (logged by the caller when int8 was an
    option). ``precision="int8"`` or ``DEEPCOVID_CPU_INT8=on`` skip the drift gate, not the checks."""
    if precision not in ("auto", "int8"):
        return f"precision {precision} was asked for"
    if device.type != "cpu":
        return "int8 runs on CPU only"
    if precision == "auto" and settings.cpu_int8 == "off":
        return "DEEPCOVID_CPU_INT8 is off"
    measured = validated_int8_drift(bundle)
    if measured is None:
        return f"bundle {bundle.bundle_id} carries no int8 networks (deepcovid bundle quantize makes them)"
    if (missing := engine_missing()) is not None:
        return missing
    if precision == "int8" or settings.cpu_int8 == "on":
        return None
    drift, auc = measured
    tolerance, auc_limit = settings.int8_tolerance, defaults.INT8_AUC_CHANGE
    if drift > tolerance:
        return f"int8 moved validation probabilities by up to {drift:.4f} (tolerance {tolerance:.4f})"
    if auc > auc_limit:
        return f"int8 changed a validation AUC by {auc:.4f} (at most {auc_limit:.4f} allowed)"
    return None


def autocast_dtype(
    device: torch.device, precision: str, settings: Settings, bundle: Bundle | None = None
) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. On CPU ``auto`` follows ``settings.cpu_bf16``: in its
    ``auto`` mode bf16 needs bf16 instructions and a bundle validated in bf16 within the tolerance."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "int8":  # asked for int8 but it cannot run: fall back as auto would
        precision = "auto"
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
