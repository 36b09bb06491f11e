"""A bundle reads only the files it holds: symbolic links are refused, and no weights file larger than its
architecture needs is read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from deepcovid.bundle import (
    MANIFEST,
    WEIGHTS_DATA_BYTES,
    BundleError,
    compute_bundle_id,
    install_bundle,
    load_bundle,
    load_networks,
    max_weights_bytes,
    weights_filename,
)
from deepcovid.networks import ARCHITECTURES

SMALL = "squeezenet1_1"  # the tiny bundle's smallest network


@pytest.fixture
def bundle_copy(tiny_bundle_path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_path, copy)
    return copy


def rewrite_manifest(path: Path, name: str) -> None:
    """Record ``name``'s current size and hash in the manifest and re-derive the id: a consistent bundle."""
    manifest = json.loads((path / MANIFEST).read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def refusal(path: Path) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(path)
    return str(caught.value)


def test_a_symlinked_weights_file_is_refused_even_with_the_right_bytes(
    bundle_copy: Path, tmp_path: Path
) -> None:
    name = weights_filename(SMALL)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle_copy / name, elsewhere)
    (bundle_copy / name).symlink_to(elsewhere)
    assert "symbolic link" in refusal(bundle_copy)


def test_a_symlinked_manifest_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "manifest.json"
    shutil.move(bundle_copy / MANIFEST, elsewhere)
    (bundle_copy / MANIFEST).symlink_to(elsewhere)
    assert "symbolic link" in refusal(bundle_copy)


def test_a_weights_file_that_is_not_a_file_is_refused(bundle_copy: Path) -> None:
    name = weights_filename(SMALL)
    (bundle_copy / name).unlink()
    os.mkfifo(bundle_copy / name)  # reading it would block for ever
    assert "not a regular file" in refusal(bundle_copy)


def test_a_weights_file_larger_than_its_architecture_needs_is_refused(bundle_copy: Path) -> None:
    name = weights_filename(SMALL)
    with (bundle_copy / name).open("ab") as handle:
        handle.truncate(max_weights_bytes(SMALL) + 1)
    rewrite_manifest(bundle_copy, name)  # hashes and id agree: only the size gives it away
    message = refusal(bundle_copy)
    assert f"{max_weights_bytes(SMALL) + 1} bytes" in message and SMALL in message


def test_weights_swapped_for_a_link_after_verification_are_not_read(
    bundle_copy: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(bundle_copy)
    name = weights_filename(SMALL)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle_copy / name, elsewhere)
    (bundle_copy / name).symlink_to(elsewhere)
    with pytest.raises(BundleError, match="cannot read"):
        load_networks(bundle, [SMALL])


def test_install_refuses_a_bundle_with_a_link(bundle_copy: Path, tmp_path: Path) -> None:
    name = weights_filename(SMALL)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle_copy / name, elsewhere)
    (bundle_copy / name).symlink_to(elsewhere)
    with pytest.raises(BundleError, match="symbolic link"):
        install_bundle(bundle_copy, tmp_path / "installed")


def test_weights_sizes_match_the_networks() -> None:
    """The table the size cap reads: float32 bytes of each network's state dict, built on the meta device."""
    import torch

    from deepcovid.networks import build_network

    with torch.device("meta"):
        measured = {
            arch: sum(t.numel() * t.element_size() for t in build_network(arch, "none").state_dict().values())
            for arch in ARCHITECTURES
        }
    assert measured == WEIGHTS_DATA_BYTES


def test_real_bundles_fit_their_caps(tiny_bundle_path: Path) -> None:
    bundle = load_bundle(tiny_bundle_path)
    for arch in bundle.architectures:
        assert bundle.weights_path(arch).stat().st_size <= max_weights_bytes(arch)
    assert set(load_networks(bundle)) == set(bundle.architectures)
