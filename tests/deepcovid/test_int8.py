"""int8 networks in bundles: stored pinned by hash, loaded without pickle, used only within the drift gate.

Real OpenVINO and NNCF (the optional ``deepcovid[openvino]`` extra); the tests skip where it is absent,
except the fallback test, which hides the engine from a fresh interpreter.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepcovid.bundle import BundleError, load_bundle
from deepcovid.ensemble import Ensemble
from deepcovid.int8 import int8_filenames
from deepcovid.settings import Settings
from tests.fixtures.services import REPO_ROOT

ARCH = "squeezenet1_1"


def _images(count: int, seed: int = 0) -> torch.Tensor:
    from deepcovid.batches import collate
    from deepcovid.preprocess import load_image
    from training.synthetic import xray_png_bytes

    return collate([load_image(xray_png_bytes(160, seed=seed + i))[0] for i in range(count)])


def test_the_bundle_pins_its_int8_files_and_records_their_drift(int8_bundle_path: Path) -> None:
    bundle = load_bundle(int8_bundle_path)
    record = bundle.manifest["int8"]
    assert record["engine"] == "openvino" and record["calibration_images"] > 0
    drift = record["networks"][ARCH]
    assert drift["files"] == list(int8_filenames(ARCH))
    assert all(name in bundle.manifest["files"] for name in drift["files"])
    assert 0 <= drift["max_abs_diff"] < 0.5 and drift["auc_change"] is not None
    assert bundle.provenance["int8_added_to"] != bundle.bundle_id


def test_int8_scores_what_the_manifest_measured(int8_bundle_path: Path) -> None:
    """Forced on (random weights need not pass the gate), the worker's int8 path runs the stored network:
    probabilities near fp32 on X-ray-like images, and labelled ``cpu int8``."""
    bundle = load_bundle(int8_bundle_path)
    int8 = Ensemble.from_bundle(bundle, device="cpu", settings=Settings(cpu_int8="on"))
    fp32 = Ensemble.from_bundle(bundle, device="cpu", precision="fp32", settings=Settings(cpu_int8="on"))
    assert int8.label == "cpu int8" and fp32.label == "cpu fp32"
    images = _images(6, seed=100)
    fast, exact = int8.probabilities(images)[ARCH], fp32.probabilities(images)[ARCH]
    assert abs(fast - exact).max() <= 0.05


def test_the_gate_refuses_a_bundle_whose_drift_is_too_large(
    int8_bundle_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = load_bundle(int8_bundle_path)
    drift = bundle.manifest["int8"]["networks"][ARCH]["max_abs_diff"]
    strict = Settings(cpu_int8="auto", int8_tolerance=drift / 2)
    with caplog.at_level(logging.INFO, logger="deepcovid"):
        ensemble = Ensemble.from_bundle(bundle, device="cpu", settings=strict)
    assert ensemble.label == "cpu fp32"
    assert "not scoring in int8: int8 moved validation probabilities by up to" in caplog.text


def test_the_gate_refuses_a_changed_auc_and_passes_a_small_drift(int8_bundle_path: Path) -> None:
    from deepcovid.precision import int8_refusal

    bundle = load_bundle(int8_bundle_path)
    cpu, loose = torch.device("cpu"), Settings(cpu_int8="auto", int8_tolerance=1.0)

    def with_auc_change(change: float):
        manifest = json.loads(json.dumps(bundle.manifest))
        manifest["int8"]["networks"][ARCH]["auc_change"] = change
        return replace(bundle, manifest=manifest)

    assert int8_refusal(cpu, "auto", loose, with_auc_change(0.004)) is None
    assert "changed a validation AUC by 0.0060" in (
        int8_refusal(cpu, "auto", loose, with_auc_change(-0.006)) or ""
    )
    assert "DEEPCOVID_CPU_INT8 is off" in (int8_refusal(cpu, "auto", Settings(cpu_int8="off"), bundle) or "")
    assert int8_refusal(torch.device("cuda"), "int8", loose, bundle) == "int8 runs on CPU only"


def test_a_tampered_int8_artifact_is_refused(int8_bundle_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle_path, copy)
    weights = copy / int8_filenames(ARCH)[1]
    verified = load_bundle(copy)  # then changed under the loaded bundle: caught as the bytes are read
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"squeezenet1_1\.int8\.bin has been modified"):
        load_bundle(copy)
    with pytest.raises(BundleError, match=r"squeezenet1_1\.int8\.bin has been modified"):
        Ensemble.from_bundle(verified, device="cpu", settings=Settings(cpu_int8="on"))


def test_without_the_engine_the_ensemble_falls_back_and_says_why(int8_bundle_path: Path) -> None:
    """A fresh interpreter where ``import openvino`` fails, as where the extra is not installed."""
    script = f"""
import logging, sys
sys.modules["openvino"] = None  # import openvino now raises ImportError
logging.basicConfig(level=logging.INFO, format="%(message)s")
from deepcovid.ensemble import Ensemble
from deepcovid.settings import Settings
ensemble = Ensemble.from_bundle({str(int8_bundle_path)!r}, device="cpu", settings=Settings(cpu_int8="on"))
print("label:", ensemble.label)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=True
    )
    assert "label: cpu fp32" in done.stdout
    assert "not scoring in int8: OpenVINO is not installed" in done.stderr
    assert "pip install 'deepcovid[openvino]'" in done.stderr


def test_an_int8_worker_still_stores_heatmaps(int8_bundle_path: Path, tmp_path: Path) -> None:
    """Compiled int8 networks keep no activations: the images asked for go once more through the bundle's
    fp32 networks, from the batch already in memory, and every scored image still gets its map."""
    from deepcovid.artifacts import LocalArtifacts
    from deepcovid.heatmaps import load_heatmap
    from deepcovid.pipeline import score_chunk
    from deepcovid.storage import open_storage
    from training.synthetic import xray_png_bytes

    archive = tmp_path / "archive"
    archive.mkdir()
    uris = []
    for i in range(5):
        (archive / f"{i}.png").write_bytes(xray_png_bytes(200, seed=300 + i))
        uris.append(str(archive / f"{i}.png"))
    settings = Settings(storage_roots=[archive], cpu_int8="on", heatmaps="all", data_dir=tmp_path / "data")
    ensemble = Ensemble.from_bundle(load_bundle(int8_bundle_path), device="cpu", settings=settings)
    assert ensemble.int8
    store = LocalArtifacts(tmp_path / "maps")
    results = score_chunk(
        uris, storage=open_storage(settings), ensemble=ensemble, settings=settings, artifacts=store
    )
    assert all(r.scored for r in results) and ensemble.label == "cpu int8"
    for result in results:
        assert result.heatmap is not None and result.heatmap.key, result.heatmap
        stored = load_heatmap(store, result.heatmap.key)
        assert stored.maps[ARCH].shape == (224, 224) and stored.maps[ARCH].max() > 0
        assert abs(stored.probabilities[ARCH] - result.probabilities[ARCH]) <= 0.05  # fp32 vs int8
