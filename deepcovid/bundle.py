"""Model bundles: the four networks' weights plus everything needed to score with them, hash-verified.

A bundle is a directory holding ``<arch>.safetensors`` per network and ``manifest.json`` (class order,
input size, normalisation, temperatures, thresholds, ensemble policy, provenance, metrics, and every
file's sha256).
Its id is derived from the manifest, which pins every file's hash, so an id names exactly one set of
weights and any changed byte is detected when the bundle is loaded. No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcovid import defaults
from deepcovid.manifest import (
    FORMAT_VERSION,
    INT8_KEY,
    MANIFEST,
    POLICIES,
    REQUIRED_KEYS,
    SUPPORTED_FORMAT_VERSIONS,
    BundleError,
    check_manifest_contents,
    check_temperatures,
    check_thresholds,
    compute_bundle_id,
    weights_filename,
)
from deepcovid.networks import (
    ARCHITECTURES,
    CLASSES,
    COVID_INDEX,
    RELU_HEAD_ARCHITECTURES,
    build_network,
    has_head_relu,
)
from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from deepcovid.private import writable_dir

if TYPE_CHECKING:
    import torch
    from torch import nn

_BUNDLE_ID = re.compile(r"^[0-9a-f]{4,64}$")


# float32 bytes of each network's state dict (parameters and buffers), what its weights file holds after
# a header of tensor names and shapes; tests/deepcovid/test_bundle_entries.py checks them against the
# networks. A file larger than that plus WEIGHTS_HEADER_ALLOWANCE is refused before it is read.
WEIGHTS_DATA_BYTES: dict[str, int] = {
    "resnet18": 44_748_712,
    "resnet50": 94_261_424,
    "squeezenet1_1": 2_894_088,
    "densenet121": 28_159_184,
}
WEIGHTS_HEADER_ALLOWANCE = 1 << 20  # densenet121's safetensors header, the largest, is 83 KB


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: where it is and what its manifest says."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.manifest["architectures"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {arch: float(t) for arch, t in self.manifest["thresholds"].items()}

    @property
    def temperatures(self) -> dict[str, float]:
        """Each network's softmax temperature (logits / T), fitted on validation; 1 where none is recorded."""
        given = self.manifest.get("temperature") or {}
        return {arch: float(given.get(arch, 1.0)) for arch in self.architectures}

    @property
    def head_relu(self) -> tuple[str, ...]:
        """The networks built with SqueezeNet's final ReLU: listed from version 2, all before it."""
        if "head_relu" in self.manifest:
            return tuple(self.manifest["head_relu"])
        return tuple(arch for arch in self.architectures if arch in RELU_HEAD_ARCHITECTURES)

    @property
    def ensemble_policy(self) -> str:
        return self.manifest["ensemble"]["policy"]

    @property
    def ensemble_threshold(self) -> float:
        return float(self.manifest["ensemble"]["threshold"])

    @property
    def created_at(self) -> str | None:
        return self.manifest.get("created_at")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.get("provenance") or {}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    def weights_path(self, arch: str) -> Path:
        return self.path / weights_filename(arch)


def max_weights_bytes(arch: str) -> int:
    """The largest weights file ``arch`` can need: its float32 tensors and their header."""
    return WEIGHTS_DATA_BYTES[arch] + WEIGHTS_HEADER_ALLOWANCE


def _regular_file(bundle_path: Path, name: str) -> os.stat_result:
    """The entry's own status (never a link's target): a symbolic link or anything but a file is refused,
    so a bundle reads only the files it holds."""
    try:
        status = (bundle_path / name).lstat()
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {bundle_path} is incomplete: {name} is missing") from exc
    except OSError as exc:
        raise BundleError(f"bundle {bundle_path}: cannot read {name}: {exc}") from exc
    if stat.S_ISLNK(status.st_mode):
        raise BundleError(f"bundle {bundle_path}: {name} is a symbolic link; a bundle holds its own files")
    if not stat.S_ISREG(status.st_mode):
        raise BundleError(f"bundle {bundle_path}: {name} is not a regular file")
    return status


def _check_weights_size(bundle_path: Path, arch: str, size: int) -> None:
    if size > max_weights_bytes(arch):
        raise BundleError(
            f"bundle {bundle_path}: {weights_filename(arch)} has {size} bytes, more than the "
            f"{max_weights_bytes(arch)} a {arch} needs"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing memory (safetensors refuses shared tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def save_bundle(
    out: Path | str,
    networks: Mapping[str, nn.Module],
    *,
    thresholds: Mapping[str, float] | None = None,
    temperatures: Mapping[str, float] | None = None,
    ensemble_policy: str = "mean",
    ensemble_threshold: float = defaults.ENSEMBLE_THRESHOLD,
    provenance: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    int8: tuple[Mapping[str, bytes], Mapping[str, Any]] | None = None,
) -> Bundle:
    """Write ``networks`` as a bundle in the new (or empty) directory ``out`` and return it, verified.

    The directory appears only when complete (written beside it, then renamed). Thresholds default to
    0.5 and temperatures to 1; ``created_at`` defaults to now (UTC) and is part of the id. ``int8``: the
    int8 networks' files (name to bytes) and their manifest record (``deepcovid.int8.int8_record``).
    """
    import torch  # torch: only the functions that touch weights import it, so manifests read light
    import torchvision
    from safetensors.torch import save_file

    out = Path(out)
    architectures = list(networks)
    if not architectures:
        raise BundleError("a bundle needs at least one network")
    unknown = [arch for arch in architectures if arch not in ARCHITECTURES]
    if unknown:
        raise BundleError(f"unknown architectures {unknown}; expected some of {', '.join(ARCHITECTURES)}")
    if ensemble_policy not in POLICIES:
        raise BundleError(
            f"unknown ensemble policy {ensemble_policy!r}; expected one of {', '.join(POLICIES)}"
        )
    if not 0.0 <= float(ensemble_threshold) <= 1.0:
        raise BundleError(f"ensemble threshold must be within [0, 1], got {ensemble_threshold}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} already exists and is not an empty directory")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for arch in architectures:
            path = staging / weights_filename(arch)
            save_file(_state_dict_for_safetensors(networks[arch]), str(path), metadata={"arch": arch})
            files[path.name] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
        for name, data in (int8[0] if int8 else {}).items():
            (staging / name).write_bytes(data)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "architectures": architectures,
            "classes": list(CLASSES),
            "covid_index": COVID_INDEX,
            "input_size": INPUT_SIZE,
            "normalization": {
                "mean": [float(v) for v in IMAGENET_MEAN],
                "std": [float(v) for v in IMAGENET_STD],
            },
            "thresholds": check_thresholds(architectures, thresholds),
            "temperature": check_temperatures(architectures, temperatures),
            "head_relu": [arch for arch in architectures if has_head_relu(networks[arch], arch)],
            "ensemble": {"policy": ensemble_policy, "threshold": float(ensemble_threshold)},
            "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": dict(provenance or {}),
            "metrics": dict(metrics or {}),
            "framework": {"torch": torch.__version__, "torchvision": torchvision.__version__},
            "files": files,
        }
        if int8:
            manifest[INT8_KEY] = dict(int8[1])
        manifest["bundle_id"] = compute_bundle_id(manifest)
        (staging / MANIFEST).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(out)


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, parsed and checked for shape but not for hashes."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    if not manifest_path.is_file() and not manifest_path.is_symlink():
        raise BundleError(f"{path} is not a complete bundle: {MANIFEST} is missing")
    _regular_file(path, MANIFEST)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} cannot be read as JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} is not a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"bundle {path} has format_version {version!r}; this version of deepcovid reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (upgrade deepcovid or re-export the bundle)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks {', '.join(missing)}")
    return manifest


def load_bundle(path: Path | str) -> Bundle:
    """Open and verify a bundle: its id, every file's size and sha256. Raises ``BundleError``."""
    path = Path(path)
    manifest = read_manifest(path)
    expected_id = compute_bundle_id(manifest)
    if manifest["bundle_id"] != expected_id:
        raise BundleError(
            f"bundle {path} has been modified: its manifest hashes to {expected_id}, "
            f"but it claims id {manifest['bundle_id']}"
        )
    check_manifest_contents(path, manifest)
    archs_by_file = {weights_filename(arch): arch for arch in manifest["architectures"]}
    for name, entry in manifest["files"].items():
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise BundleError(f"bundle {path}: invalid file name {name!r} in the manifest")
        file_path = path / name
        size = _regular_file(path, name).st_size
        if name in archs_by_file:
            _check_weights_size(path, archs_by_file[name], size)
        if size != entry.get("size"):
            raise BundleError(
                f"bundle {path}: {name} has {size} bytes, the manifest says {entry.get('size')}"
            )
        if _sha256_file(file_path) != entry.get("sha256"):
            raise BundleError(f"bundle {path}: {name} has been modified (sha256 does not match the manifest)")
    return Bundle(path=path, manifest=manifest)


def load_networks(
    bundle: Bundle | Path | str, architectures: list[str] | None = None
) -> dict[str, nn.Module]:
    """Build each network with random weights, then load the bundle's weights strictly (eval mode, CPU).

    The bytes are hashed again as they are loaded, so a file swapped after ``load_bundle`` is caught.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    networks: dict[str, nn.Module] = {}
    for arch in architectures or bundle.architectures:
        if arch not in bundle.architectures:
            raise BundleError(f"bundle {bundle.bundle_id} has no {arch} network")
        name = weights_filename(arch)
        data = _read_weights(bundle, arch)
        if hashlib.sha256(data).hexdigest() != bundle.manifest["files"][name]["sha256"]:
            raise BundleError(f"bundle {bundle.path}: {name} has been modified (sha256 does not match)")
        try:
            state = load_safetensors(data)
        except SafetensorError as exc:
            raise BundleError(f"bundle {bundle.path}: {name} is not a valid safetensors file: {exc}") from exc
        model = build_network(arch, "none", head_relu=arch in bundle.head_relu)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"bundle {bundle.path}: {name} does not fit {arch}: {exc}") from exc
        networks[arch] = model.eval()
    return networks


def _read_weights(bundle: Bundle, arch: str) -> bytes:
    """The weights file's bytes, read without following a symbolic link (one swapped in after
    ``load_bundle`` is refused) and never more than ``arch`` can need."""
    name = weights_filename(arch)
    limit = max_weights_bytes(arch)
    try:
        fd = os.open(bundle.weights_path(arch), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            _check_weights_size(bundle.path, arch, os.fstat(handle.fileno()).st_size)
            data = handle.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"bundle {bundle.path}: cannot read {name}: {exc}") from exc
    _check_weights_size(bundle.path, arch, len(data))
    return data


def install_bundle(bundle: Bundle | Path | str, bundles_dir: Path | str) -> Path:
    """Copy a verified bundle to ``bundles_dir/<bundle_id>/`` atomically; a no-op when already there.

    An installed copy that no longer verifies is replaced. A bundles dir that cannot be made or written
    is a ``UserError`` (exit 21).
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    bundles_dir = Path(bundles_dir)
    destination = bundles_dir / bundle.bundle_id
    if destination.exists() and _installed_ok(destination, bundle.bundle_id):
        return destination  # a read-only bundles dir that already holds it is fine
    writable_dir(
        bundles_dir,
        what="bundles dir",
        elsewhere="set DEEPCOVID_BUNDLES_DIR to a writable directory",
        make=lambda path: path.mkdir(parents=True, exist_ok=True),  # not patient data: the umask decides
    )

    staging = bundles_dir / f".{bundle.bundle_id}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name in [*bundle.manifest["files"], MANIFEST]:
            shutil.copyfile(bundle.path / name, staging / name, follow_symlinks=False)
        load_bundle(staging)  # the copy itself must verify before it becomes visible
        if destination.exists():  # broken install: move it aside, then take its place
            stale = bundles_dir / f".{bundle.bundle_id}.stale-{uuid.uuid4().hex[:8]}"
            os.replace(destination, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, destination)
        except OSError:
            # Another process installed it between our check and the rename: keep theirs if it verifies.
            if not _installed_ok(destination, bundle.bundle_id):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _installed_ok(path: Path, bundle_id: str) -> bool:
    try:
        return load_bundle(path).bundle_id == bundle_id
    except BundleError:
        return False


def find_bundle(bundle_id: str, bundles_dir: Path | str) -> Bundle:
    """The installed bundle with this id (or unique id prefix of at least 4 hex digits), verified."""
    bundles_dir = Path(bundles_dir)
    if not isinstance(bundle_id, str) or not _BUNDLE_ID.match(bundle_id):
        raise BundleError(f"{bundle_id!r} is not a bundle id (hex digits)")
    exact = bundles_dir / bundle_id
    if exact.is_dir():
        return load_bundle(exact)
    matches = (
        sorted(p for p in bundles_dir.iterdir() if p.is_dir() and p.name.startswith(bundle_id))
        if bundles_dir.is_dir()
        else []
    )
    matches = [p for p in matches if _BUNDLE_ID.match(p.name)]
    if len(matches) == 1:
        return load_bundle(matches[0])
    if len(matches) > 1:
        raise BundleError(f"bundle id prefix {bundle_id} is ambiguous in {bundles_dir}")
    raise BundleError(
        f"bundle {bundle_id} is not installed in {bundles_dir}; register it with `deepcovid bundle register`"
    )


def check_preprocessing(bundle: Bundle, input_size: int, mean: Any, std: Any) -> None:
    """Refuse a bundle trained with inputs this build's preprocessing does not produce."""
    manifest = bundle.manifest
    norm = manifest.get("normalization", {})

    def same(recorded: Any, used: Any) -> bool:
        recorded, used = np.asarray(recorded, dtype=float), np.asarray(used, dtype=float)
        return recorded.shape == used.shape and bool(np.allclose(recorded, used, atol=1e-6))

    if (
        int(manifest.get("input_size", -1)) != int(input_size)
        or not same(norm.get("mean", []), mean)
        or not same(norm.get("std", []), std)
    ):
        raise BundleError(
            f"bundle {bundle.bundle_id} expects input size {manifest.get('input_size')} and normalisation "
            f"{norm}; this build preprocesses to {input_size} with mean {list(mean)} and std {list(std)}"
        )
