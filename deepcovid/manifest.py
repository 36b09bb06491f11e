"""What a bundle's manifest must say, and the id derived from it: kept apart from the files it lists.

The manifest pins every weights file's sha256 and the id is the hash of the manifest, so checking the
manifest's contents here and the files in ``deepcovid.bundle`` verifies the whole bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepcovid import defaults
from deepcovid.networks import ARCHITECTURES, CLASSES, RELU_HEAD_ARCHITECTURES

# Version 2 added per-network ``temperature`` (thresholds are on calibrated probabilities) and ``head_relu``
# (SqueezeNet lost its final ReLU): a reader of version 1 would ignore both and mis-score, so it must
# refuse. A version 1 manifest reads as temperature 1 and SqueezeNet with its ReLU, as it was trained.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# Optional: int8 networks (OpenVINO IR, extra files pinned like the weights) and their measured drift. A
# reader that ignores them scores the safetensors weights correctly, so they need no new format version.
INT8_KEY = "int8"
POLICIES = ("mean", "majority", "any")
BUNDLE_ID_LENGTH = 16
REQUIRED_KEYS = (
    "format_version",
    "bundle_id",
    "architectures",
    "classes",
    "input_size",
    "normalization",
    "thresholds",
    "ensemble",
    "files",
)


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with, or of a format this version cannot read."""


def weights_filename(arch: str) -> str:
    return f"{arch}.safetensors"


def compute_bundle_id(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its id; the first 16 hex digits."""
    body = {key: value for key, value in manifest.items() if key != "bundle_id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:BUNDLE_ID_LENGTH]


def check_thresholds(architectures: list[str], thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """Every network's threshold (0.5 unless given), each a probability."""
    given = dict(thresholds or {})
    unknown = set(given) - set(architectures)
    if unknown:
        raise BundleError(f"thresholds given for networks not in the bundle: {', '.join(sorted(unknown))}")
    out = {arch: float(given.get(arch, defaults.ENSEMBLE_THRESHOLD)) for arch in architectures}
    for arch, value in out.items():
        if not 0.0 <= value <= 1.0:
            raise BundleError(f"threshold for {arch} must be within [0, 1], got {value}")
    return out


def check_temperatures(
    architectures: list[str], temperatures: Mapping[str, float] | None
) -> dict[str, float]:
    """Every network's temperature (1 unless given), each finite and positive: logits are divided by it."""
    given = dict(temperatures or {})
    unknown = set(given) - set(architectures)
    if unknown:
        raise BundleError(f"temperatures given for networks not in the bundle: {', '.join(sorted(unknown))}")
    out = {arch: float(given.get(arch, 1.0)) for arch in architectures}
    for arch, value in out.items():
        if not (math.isfinite(value) and value > 0.0):
            raise BundleError(f"temperature for {arch} must be a positive number, got {value}")
    return out


def check_manifest_contents(path: Path, manifest: dict[str, Any]) -> None:
    """What a manifest must say, beyond having its keys, for its networks to be built and scored."""
    architectures = manifest["architectures"]
    if not isinstance(architectures, list) or not architectures:
        raise BundleError(f"bundle {path}: architectures must be a non-empty list")
    unknown = [arch for arch in architectures if arch not in ARCHITECTURES]
    if unknown:
        raise BundleError(f"bundle {path} holds networks this version cannot build: {unknown}")
    if tuple(manifest["classes"]) != CLASSES:
        raise BundleError(f"bundle {path} has class order {manifest['classes']}, expected {list(CLASSES)}")
    files = manifest["files"]
    for arch in architectures:
        if weights_filename(arch) not in files:
            raise BundleError(f"bundle {path}: no weights file listed for {arch}")
        if arch not in manifest["thresholds"]:
            raise BundleError(f"bundle {path}: no threshold for {arch}")
    if manifest["format_version"] >= 2:
        _check_version2(path, manifest)
    if INT8_KEY in manifest:
        _check_int8(path, manifest)
    if manifest["ensemble"].get("policy") not in POLICIES:
        raise BundleError(f"bundle {path}: unknown ensemble policy {manifest['ensemble'].get('policy')!r}")


def _check_version2(path: Path, manifest: dict[str, Any]) -> None:
    """Version 2 states every network's temperature and which heads keep a ReLU; no guessing."""
    temperatures, relu = manifest.get("temperature"), manifest.get("head_relu")
    if not isinstance(temperatures, dict) or not isinstance(relu, list):
        raise BundleError(f"bundle {path}: a version 2 manifest needs temperature and head_relu")
    for arch in manifest["architectures"]:
        value = temperatures.get(arch)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise BundleError(f"bundle {path}: temperature for {arch} must be a positive number: {value!r}")
    if any(arch not in RELU_HEAD_ARCHITECTURES or arch not in manifest["architectures"] for arch in relu):
        raise BundleError(f"bundle {path}: head_relu names networks without such a head: {relu}")


def _check_int8(path: Path, manifest: dict[str, Any]) -> None:
    """An int8 record names, for every network, files the manifest pins and the drift measured."""
    record = manifest[INT8_KEY]
    networks = record.get("networks") if isinstance(record, dict) else None
    if not isinstance(networks, dict) or set(networks) != set(manifest["architectures"]):
        raise BundleError(f"bundle {path}: the int8 record must cover every network of the bundle")
    for arch, entry in networks.items():
        names = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(names, list) or not names or any(name not in manifest["files"] for name in names):
            raise BundleError(f"bundle {path}: the int8 files of {arch} are not pinned in the manifest")
        if not isinstance(entry.get("max_abs_diff"), (int, float)):
            raise BundleError(f"bundle {path}: the int8 record of {arch} lacks its measured drift")
