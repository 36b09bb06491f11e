"""int8 networks for a bundle: calibrated on training images, their drift measured on validation images.

``deepcovid train`` does it for the bundle it writes; ``deepcovid bundle quantize`` for an existing bundle,
splitting the given data as that bundle's training did (seed and fractions from its provenance), so the
drift is measured on the bundle's own validation split whenever it is given the same data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcovid import defaults
from deepcovid.bundle import Bundle, load_bundle, load_networks, save_bundle
from deepcovid.int8 import compile_network, int8_drift, int8_filenames, int8_record, quantize_network
from deepcovid.settings import get_settings
from training.data import data_id, decode_samples, load_labelled, split_samples

log = logging.getLogger(__name__)


def calibration_subset(images: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Up to ``limit`` of ``images``, drawn at random (seeded) so both classes calibrate the ranges."""
    count = int(images.shape[0])
    if count <= limit:
        return images
    order = np.random.default_rng(seed).permutation(count)[:limit]
    return images[torch.from_numpy(np.sort(order))]


def quantize_models(
    models: Mapping[str, nn.Module],
    calibration: torch.Tensor,
    validation: torch.Tensor,
    labels: np.ndarray,
    temperatures: Mapping[str, float],
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Each network quantized to int8 and checked against fp32 on the labelled ``validation`` images: the
    files to store in the bundle and the manifest's int8 record."""
    files: dict[str, bytes] = {}
    drift: dict[str, dict[str, Any]] = {}
    threads = os.cpu_count() or 1
    for arch, model in models.items():
        xml, weights = quantize_network(model, calibration)
        network = compile_network(xml, weights, threads)
        drift[arch] = int8_drift(model, network, validation, labels, float(temperatures.get(arch, 1.0)))
        log.info("int8 %s on %d validation images: %s", arch, int(validation.shape[0]), drift[arch])
        xml_name, bin_name = int8_filenames(arch)
        files[xml_name], files[bin_name] = xml, weights
    return files, int8_record(drift, int(calibration.shape[0]), int(validation.shape[0]))


def quantize_bundle(
    bundle: Bundle | Path | str,
    data: Path,
    out: Path,
    *,
    calibration_images: int = defaults.INT8_CALIBRATION_IMAGES,
    val_fraction: float | None = None,
    seed: int | None = None,
) -> Bundle:
    """A copy of ``bundle`` in ``out`` with int8 networks added (a new bundle id: its manifest changes).

    ``data`` is split as the bundle's training split it (its recorded seed and fractions, unless given):
    calibration on training images, drift on validation images.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    trained = (bundle.provenance.get("args") or {}) if isinstance(bundle.provenance, dict) else {}
    split = split_samples(
        load_labelled(data),
        val_fraction=float(val_fraction if val_fraction is not None else trained.get("val_fraction", 0.2)),
        test_fraction=float(trained.get("test_fraction", 0.0)) if not trained.get("test") else 0.0,
        seed=int(seed if seed is not None else trained.get("seed", 0)),
    )
    same_split = data_id(split.train + split.val) == bundle.provenance.get("data_id")
    max_pixels = get_settings().max_image_pixels
    train = decode_samples(split.train, max_pixels=max_pixels)
    val = decode_samples(split.val, max_pixels=max_pixels)
    if len(set(val.labels.tolist())) < 2:
        raise ValueError("the validation images hold one class only: the AUC change cannot be measured")
    calibration = calibration_subset(train.images, calibration_images)
    int8 = quantize_models(
        load_networks(bundle), calibration, val.images, val.labels.numpy(), bundle.temperatures
    )
    int8[1]["validation_split"] = "the bundle's own" if same_split else "held out from the calibration data"
    return save_bundle(
        out,
        load_networks(bundle),
        thresholds=bundle.thresholds,
        temperatures=bundle.temperatures,
        ensemble_policy=bundle.ensemble_policy,
        ensemble_threshold=bundle.ensemble_threshold,
        provenance={**bundle.provenance, "int8_added_to": bundle.bundle_id},
        metrics=bundle.metrics,
        created_at=bundle.created_at,
        int8=int8,
    )
