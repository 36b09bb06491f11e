"""The int8 rows of ensemble_throughput.py: a bundle with int8 networks, and the OpenVINO reference.

The reference is what a user of OpenVINO would write without this project: each network converted as it
is, quantized by ``nncf.quantize`` with its defaults, compiled with OpenVINO's default CPU configuration,
and the four run one after the other on the batch. End to end, it first decodes the images with a thread
pool, then scores them batch by batch (no overlap of decoding and compute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcovid.batches import collate, normalize
from deepcovid.bundle import Bundle, load_networks, save_bundle
from deepcovid.preprocess import load_image
from training.quantize import quantize_models

REFERENCE = "OpenVINO int8 (NNCF default)"


def int8_bundle(bundle: Bundle, out: Path, calibration: torch.Tensor) -> Bundle:
    """``bundle`` again with int8 networks calibrated on ``calibration`` (uint8); drift measured against
    made-up labels, since the weights are random (the benchmark forces int8 on)."""
    networks = load_networks(bundle)
    labels = np.arange(int(calibration.shape[0])) % 2
    int8 = quantize_models(networks, calibration, calibration, labels, bundle.temperatures)
    return save_bundle(out, networks, provenance={"note": "random weights, int8 for benchmarks"}, int8=int8)


def reference_models(bundle: Bundle, calibration: torch.Tensor) -> list[Any]:
    """Each network converted, quantized and compiled with OpenVINO's and NNCF's defaults."""
    import nncf
    import openvino as ov

    core = ov.Core()
    compiled = []
    example = normalize(calibration[:1])
    for model in load_networks(bundle).values():
        with torch.no_grad():
            graph = ov.convert_model(model.eval(), example_input=example, input=[(-1, 3, 224, 224)])
        items = [normalize(calibration[i : i + 1]).contiguous().numpy() for i in range(calibration.shape[0])]
        quantized = nncf.quantize(graph, nncf.Dataset(items))
        compiled.append(core.compile_model(quantized, "CPU"))
    return compiled


def _score(models: list[Any], batch: torch.Tensor) -> None:
    inputs = np.ascontiguousarray(normalize(batch).numpy())
    for model in models:
        model(inputs)


def reference_compute_runner(models: list[Any], batch: torch.Tensor, count: int) -> Callable[[], float]:
    calls = max(1, -(-count // batch.shape[0]))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            _score(models, batch)
        return calls * batch.shape[0] / (time.perf_counter() - start)

    return run


def reference_end_to_end_runner(
    models: list[Any], paths: list[Path], batch_size: int, decode_threads: int
) -> Callable[[], float]:
    def one(path: Path) -> np.ndarray:
        return load_image(path.read_bytes(), name=path.name)[0]

    def run() -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(decode_threads) as pool:
            images = list(pool.map(one, paths))
        for i in range(0, len(images), batch_size):
            _score(models, collate(images[i : i + batch_size]))
        return len(paths) / (time.perf_counter() - start)

    return run
