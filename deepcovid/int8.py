"""int8 networks for CPU workers: OpenVINO IR quantized by NNCF, kept in bundles, run from hash-checked bytes.

OpenVINO is an optional extra (``pip install 'deepcovid[openvino]'``); without it workers score in bf16 or
fp32 and say why. An IR is an XML graph plus raw weights: reading it executes no code (no pickle). It is
read from bytes whose sha256 was just checked, never from a path that could be swapped in between.

Chosen by measurement over PyTorch PT2E + ``X86InductorQuantizer`` under ``torch.compile``
(docs/performance.md): faster at the same drift, and no compile step when a worker starts.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcovid.batches import normalize
from deepcovid.manifest import INT8_KEY, BundleError
from deepcovid.networks import COVID_INDEX, prepare_network
from deepcovid.preprocess import INPUT_SIZE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deepcovid.bundle import Bundle

ENGINE = "openvino"


def engine_missing() -> str | None:
    """Why int8 cannot run in this process (the optional engine is not installed), or None."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"OpenVINO is not installed ({exc}); install it with pip install 'deepcovid[openvino]'"
    return None


def engine_versions() -> dict[str, str]:
    """The OpenVINO and NNCF versions a quantization was made with (recorded in the manifest)."""
    import nncf
    import openvino

    return {"openvino": openvino.__version__, "nncf": nncf.__version__}


def int8_filenames(arch: str) -> tuple[str, str]:
    """The IR graph and weights file of ``arch``'s int8 network in a bundle."""
    return f"{arch}.int8.xml", f"{arch}.int8.bin"


def compile_config(threads: int) -> dict[str, Any]:
    """One network on ``threads`` cores, one request at a time, as the Ensemble's CPU streams run it.

    Non-quantized operations stay in fp32 whatever the CPU (OpenVINO would pick bf16 on AMX machines), so a
    worker runs exactly what the drift check measured. No pinning: decode threads share the cores.
    """
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(max(1, threads)),
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": "NO",
    }


class Int8Network:
    """A compiled int8 network called like the torch module it replaces: normalised inputs in, logits out."""

    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one call at a time

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch

        array = np.ascontiguousarray(inputs.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            self._request.infer({0: array})
            logits = np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return torch.from_numpy(logits)


def quantize_network(model: nn.Module, calibration: torch.Tensor) -> tuple[bytes, bytes]:
    """Post-training static int8 quantization of ``model`` (BatchNorm folded, as workers run it) with NNCF,
    its activation ranges calibrated on the uint8 ``calibration`` images; the IR as (xml, bin) bytes."""
    import nncf
    import openvino as ov
    import torch

    served = prepare_network(copy.deepcopy(model).float(), torch.device("cpu"))
    example = normalize(calibration[:1])
    with torch.no_grad():
        graph = ov.convert_model(served, example_input=example, input=[(-1, 3, INPUT_SIZE, INPUT_SIZE)])
    # One image per calibration item: NNCF's statistics are defined per sample.
    dataset = nncf.Dataset(
        range(int(calibration.shape[0])), lambda i: normalize(calibration[i : i + 1]).contiguous().numpy()
    )
    # The fully connected heads (ResNets, DenseNet) stay in fp32: a negligible share of the compute, and
    # on the shared CXRs quantizing them moved ResNet-18's probabilities 2.7x as much (docs/performance.md).
    head = nncf.IgnoredScope(types=["MatMul"], validate=False)  # SqueezeNet has none
    quantized = nncf.quantize(graph, dataset, subset_size=int(calibration.shape[0]), ignored_scope=head)
    with tempfile.TemporaryDirectory(prefix="deepcovid-int8-") as tmp:
        xml = Path(tmp) / "network.xml"
        ov.save_model(quantized, xml, compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def compile_network(xml: bytes, weights: bytes, threads: int) -> Int8Network:
    """An int8 network from IR bytes (already hash-checked by the caller), ready to run on CPU."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
    return Int8Network(core.compile_model(model, "CPU", compile_config(threads)))


def _read_checked(bundle: Bundle, name: str, limit: int) -> bytes:
    """A bundle file's bytes (no symbolic link followed, at most ``limit``), refused unless they hash to
    what the manifest pins."""
    entry = bundle.manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise BundleError(f"bundle {bundle.path}: {name} is not listed in the manifest")
    try:
        fd = os.open(bundle.path / name, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"bundle {bundle.path}: cannot read {name}: {exc}") from exc
    if len(data) > limit or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise BundleError(f"bundle {bundle.path}: {name} has been modified (sha256 does not match)")
    return data


def load_int8_networks(bundle: Bundle, threads: int) -> dict[str, Int8Network]:
    """Every network's int8 IR from the bundle, hash-checked as it is read, compiled for ``threads``
    cores each. Raises ``BundleError`` when the bundle carries none or a file was changed."""
    from deepcovid.bundle import max_weights_bytes

    record = bundle.manifest.get(INT8_KEY)
    if not isinstance(record, dict):
        raise BundleError(f"bundle {bundle.bundle_id} carries no int8 networks")
    networks: dict[str, Int8Network] = {}
    for arch in bundle.architectures:
        xml_name, bin_name = int8_filenames(arch)
        limit = max_weights_bytes(arch)
        xml, weights = _read_checked(bundle, xml_name, limit), _read_checked(bundle, bin_name, limit)
        networks[arch] = compile_network(xml, weights, threads)
    return networks


def covid_probabilities(
    network: Any, images: torch.Tensor, temperature: float, batch_size: int = 16
) -> np.ndarray:
    """COVID probabilities of uint8 ``images`` through ``network`` (torch module or ``Int8Network``)."""
    import torch

    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, int(images.shape[0]), batch_size):
            logits = network(normalize(images[start : start + batch_size])).float()
            out.append(torch.softmax(logits / temperature, dim=1)[:, COVID_INDEX].numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def int8_drift(
    model: nn.Module,
    network: Int8Network,
    images: torch.Tensor,
    labels: np.ndarray,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """How far int8 moves ``model`` on labelled uint8 validation ``images``: the largest |int8 - fp32|
    COVID probability and the ROC AUC of each (None with one class only), as workers will score."""
    import torch

    served = prepare_network(copy.deepcopy(model).float(), torch.device("cpu"))
    exact = covid_probabilities(served, images, temperature)
    fast = covid_probabilities(network, images, temperature)
    auc_fp32, auc_int8 = _auc(labels, exact), _auc(labels, fast)
    change = None if auc_fp32 is None or auc_int8 is None else auc_int8 - auc_fp32
    return {
        "max_abs_diff": round(float(np.abs(fast - exact).max()) if len(exact) else math.nan, 6),
        "auc_fp32": None if auc_fp32 is None else round(auc_fp32, 6),
        "auc_int8": None if auc_int8 is None else round(auc_int8, 6),
        "auc_change": None if change is None else round(change, 6),
    }


def int8_record(
    networks: Mapping[str, Mapping[str, Any]], calibration_images: int, validation_images: int
) -> dict[str, Any]:
    """The manifest's ``int8`` entry: engine, versions, image counts, and per network its files and drift."""
    return {
        "engine": ENGINE,
        **engine_versions(),
        "calibration_images": int(calibration_images),
        "validation_images": int(validation_images),
        "networks": {
            arch: {"files": list(int8_filenames(arch)), **dict(drift)} for arch, drift in networks.items()
        },
    }
