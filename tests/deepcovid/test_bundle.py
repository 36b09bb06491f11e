"""Bundles: round trip, content-derived ids, tamper detection, installation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deepcovid.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    compute_bundle_id,
    find_bundle,
    install_bundle,
    load_bundle,
    load_networks,
    save_bundle,
)
from deepcovid.networks import build_network

CREATED = "2024-01-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def small_networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {arch: build_network(arch, "none") for arch in ("squeezenet1_1", "resnet18")}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, small_networks: dict[str, nn.Module]) -> Bundle:
    return save_bundle(
        tmp_path_factory.mktemp("bundles") / "small",
        small_networks,
        thresholds={"resnet18": 0.3},
        provenance={"kind": "test"},
        metrics={"auc": 0.5},
        created_at=CREATED,
    )


@pytest.fixture(scope="module")
def squeeze_bundle(tmp_path_factory: pytest.TempPathFactory, small_networks: dict[str, nn.Module]) -> Bundle:
    """A single small network: cheap to copy for the tamper tests."""
    return save_bundle(
        tmp_path_factory.mktemp("bundles") / "squeeze",
        {"squeezenet1_1": small_networks["squeezenet1_1"]},
        created_at=CREATED,
    )


def _copy(bundle: Bundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle.path, tmp_path / "copy"))


def test_round_trip_keeps_every_tensor(small_bundle: Bundle, small_networks: dict[str, nn.Module]) -> None:
    loaded = load_networks(load_bundle(small_bundle.path))
    assert list(loaded) == ["squeezenet1_1", "resnet18"]
    for arch, model in loaded.items():
        original = small_networks[arch].state_dict()
        restored = model.state_dict()
        assert original.keys() == restored.keys()
        for key in original:
            assert torch.equal(original[key], restored[key]), (arch, key)
        assert not model.training


def test_manifest_records_what_scoring_needs(small_bundle: Bundle) -> None:
    manifest = json.loads((small_bundle.path / MANIFEST).read_text())
    assert manifest["format_version"] == 2
    assert manifest["temperature"] == {"squeezenet1_1": 1.0, "resnet18": 1.0} and manifest["head_relu"] == []
    assert manifest["bundle_id"] == small_bundle.bundle_id == compute_bundle_id(manifest)
    assert len(small_bundle.bundle_id) == 16
    assert manifest["classes"] == ["non_covid", "covid"] and manifest["covid_index"] == 1
    assert manifest["input_size"] == 224
    assert manifest["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert small_bundle.thresholds == {"squeezenet1_1": 0.5, "resnet18": 0.3}
    assert (small_bundle.ensemble_policy, small_bundle.ensemble_threshold) == ("mean", 0.5)
    assert small_bundle.provenance == {"kind": "test"} and small_bundle.metrics == {"auc": 0.5}
    assert set(manifest["files"]) == {"squeezenet1_1.safetensors", "resnet18.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (small_bundle.path / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert sorted(p.name for p in small_bundle.path.iterdir()) == [
        "manifest.json",
        "resnet18.safetensors",
        "squeezenet1_1.safetensors",
    ]


def test_id_depends_only_on_content(
    tmp_path: Path, small_networks: dict[str, nn.Module], squeeze_bundle: Bundle
) -> None:
    net = {"squeezenet1_1": small_networks["squeezenet1_1"]}
    again = save_bundle(tmp_path / "again", net, created_at=CREATED)
    assert again.bundle_id == squeeze_bundle.bundle_id
    other_threshold = save_bundle(tmp_path / "t", net, thresholds={"squeezenet1_1": 0.4}, created_at=CREATED)
    assert other_threshold.bundle_id != squeeze_bundle.bundle_id
    other_weights = {"squeezenet1_1": build_network("squeezenet1_1", "none")}
    assert (
        save_bundle(tmp_path / "w", other_weights, created_at=CREATED).bundle_id != squeeze_bundle.bundle_id
    )


def test_one_flipped_byte_in_weights_is_detected(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    weights = copy / "squeezenet1_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"squeezenet1_1\.safetensors has been modified"):
        load_bundle(copy)


def test_a_file_swapped_after_verification_is_not_loaded(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    bundle = load_bundle(copy)
    weights = copy / "squeezenet1_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="modified"):
        load_networks(bundle)


def test_an_edited_manifest_is_detected(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["thresholds"]["squeezenet1_1"] = 0.01
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has been modified"):
        load_bundle(copy)


def test_an_edited_manifest_with_a_recomputed_id_still_fails_on_the_file_hash(
    squeeze_bundle: Bundle, tmp_path: Path
) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    weights = copy / "squeezenet1_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified"):
        load_bundle(copy)


def test_a_missing_file_is_detected(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    (copy / "squeezenet1_1.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete: squeezenet1_1.safetensors is missing"):
        load_bundle(copy)


def test_a_missing_manifest_is_detected(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(copy)


@pytest.mark.parametrize("version", [3, None, "1"])
def test_unknown_format_versions_are_refused(squeeze_bundle: Bundle, tmp_path: Path, version: object) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = version
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(copy)


def test_garbage_manifest_and_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nope")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        load_bundle(tmp_path)


def test_manifest_file_names_cannot_escape_the_bundle(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    copy = _copy(squeeze_bundle, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="invalid file name"):
        load_bundle(copy)


def test_save_refuses_a_non_empty_directory_and_bad_settings(
    tmp_path: Path, small_networks: dict[str, nn.Module]
) -> None:
    net = {"squeezenet1_1": small_networks["squeezenet1_1"]}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BundleError, match="not an empty directory"):
        save_bundle(tmp_path / "full", net)
    with pytest.raises(BundleError, match="unknown ensemble policy"):
        save_bundle(tmp_path / "a", net, ensemble_policy="vote")
    with pytest.raises(BundleError, match="within"):
        save_bundle(tmp_path / "b", net, thresholds={"squeezenet1_1": 1.5})
    with pytest.raises(BundleError, match="not in the bundle"):
        save_bundle(tmp_path / "c", net, thresholds={"resnet50": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written left behind
    (tmp_path / "empty").mkdir()
    assert save_bundle(tmp_path / "empty", net).path == tmp_path / "empty"


def test_shared_tensors_are_saved() -> None:
    from deepcovid.bundle import _state_dict_for_safetensors

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    state = _state_dict_for_safetensors(Tied())
    from safetensors.torch import save

    assert torch.equal(state["a.weight"], state["b.weight"])
    assert save(state)


def test_install_is_atomic_idempotent_and_findable(small_bundle: Bundle, tmp_path: Path) -> None:
    bundles_dir = tmp_path / "bundles"
    installed = install_bundle(small_bundle, bundles_dir)
    assert installed == bundles_dir / small_bundle.bundle_id
    stamp = (installed / MANIFEST).stat().st_mtime_ns
    assert install_bundle(small_bundle.path, bundles_dir) == installed
    assert (installed / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in bundles_dir.iterdir()] == [small_bundle.bundle_id]  # no staging leftovers
    found = find_bundle(small_bundle.bundle_id, bundles_dir)
    assert found.path == installed and found.bundle_id == small_bundle.bundle_id
    assert find_bundle(small_bundle.bundle_id[:6], bundles_dir).path == installed


def test_a_broken_install_is_replaced(squeeze_bundle: Bundle, tmp_path: Path) -> None:
    installed = install_bundle(squeeze_bundle, tmp_path)
    (installed / "squeezenet1_1.safetensors").write_bytes(b"broken")
    assert install_bundle(squeeze_bundle, tmp_path) == installed
    assert load_bundle(installed).bundle_id == squeeze_bundle.bundle_id


def test_find_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not installed"):
        find_bundle("0123456789abcdef", tmp_path)
    for bad in ("../etc", "", "XYZ", "ab/cd"):
        with pytest.raises(BundleError, match="not a bundle id"):
            find_bundle(bad, tmp_path)
