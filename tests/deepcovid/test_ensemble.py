"""Ensemble scoring: combining rules, batch invariance, precision, devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcovid.bundle import MANIFEST, Bundle, BundleError, compute_bundle_id, load_bundle
from deepcovid.devices import resolve_device
from deepcovid.ensemble import Ensemble, ScoreBatch, combine
from deepcovid.networks import ARCHITECTURES
from tests.fixtures.images import synthetic_batch

# bf16 autocast on CPU moved COVID probabilities by at most 0.009 (random-weight networks, real CXRs);
# bf16 is only allowed where it stays within this bound.
BF16_TOLERANCE = 0.05


def xray_like_batch(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B,3,224,224]: smooth gray structures plus noise, the same image in all three channels."""
    return torch.from_numpy(synthetic_batch(count, seed))


@pytest.fixture(scope="module")
def full_bundle(full_bundle_path: Path) -> Bundle:
    """The shared four-network random bundle (tests/fixtures/services.py), default thresholds 0.5."""
    return load_bundle(full_bundle_path)


@pytest.fixture(scope="module")
def small_bundle(tiny_bundle_path: Path) -> Bundle:
    """The shared resnet18 + squeezenet1_1 random bundle."""
    return load_bundle(tiny_bundle_path)


@pytest.fixture(scope="module")
def full_ensemble(full_bundle: Bundle) -> Ensemble:
    return Ensemble.from_bundle(full_bundle, device="cpu", precision="fp32")


# --- combine: pure numpy, on hand-made numbers --------------------------------------------------

PROBS = {
    "a": np.array([0.9, 0.2, 0.6, 0.4]),
    "b": np.array([0.8, 0.1, 0.4, 0.45]),
    "c": np.array([0.7, 0.3, 0.2, 0.5]),
    "d": np.array([0.6, 0.2, 0.1, 0.3]),
}
THRESHOLDS = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.25}


def test_combine_mean() -> None:
    out = combine(PROBS, THRESHOLDS, "mean", 0.5)
    np.testing.assert_allclose(out.ensemble_score, [0.75, 0.2, 0.325, 0.4125])
    assert out.ensemble_decision.tolist() == [True, False, False, False]
    assert out.decisions["a"].tolist() == [True, False, True, False]
    assert out.decisions["d"].tolist() == [True, False, False, True]
    np.testing.assert_allclose(out.disagreement, [0.3, 0.2, 0.5, 0.2])
    assert out.thresholds == {**THRESHOLDS, "ensemble": 0.5}


def test_combine_majority_counts_a_tie_as_covid() -> None:
    out = combine(PROBS, THRESHOLDS, "majority", 0.5)
    # votes per image: 4, 0, 1, 2 (c at exactly its threshold votes COVID)
    np.testing.assert_allclose(out.ensemble_score, [1.0, 0.0, 0.25, 0.5])
    assert out.ensemble_decision.tolist() == [True, False, False, True]
    three_of_four = combine(PROBS, THRESHOLDS, "majority", 0.75)
    assert three_of_four.ensemble_decision.tolist() == [True, False, False, False]


def test_combine_any() -> None:
    out = combine(PROBS, THRESHOLDS, "any", 0.99)
    np.testing.assert_allclose(out.ensemble_score, [0.9, 0.3, 0.6, 0.5])
    assert out.ensemble_decision.tolist() == [True, False, True, True]


def test_threshold_is_inclusive_and_defaults_to_half() -> None:
    out = combine({"a": np.array([0.5, 0.4999])})
    assert out.decisions["a"].tolist() == [True, False]
    assert out.ensemble_decision.tolist() == [True, False]
    assert out.thresholds == {"a": 0.5, "ensemble": 0.5}


def test_combine_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="policy"):
        combine(PROBS, THRESHOLDS, "vote", 0.5)
    with pytest.raises(ValueError, match="no threshold for d"):
        combine(PROBS, {"a": 0.5, "b": 0.5, "c": 0.5}, "mean", 0.5)
    with pytest.raises(ValueError, match="different numbers"):
        combine({"a": np.zeros(2), "b": np.zeros(3)})


def test_result_fields_are_plain_python() -> None:
    out = combine(PROBS, THRESHOLDS, "mean", 0.5)
    fields = out.result_fields(2)
    assert fields == {
        "probabilities": {"a": 0.6, "b": 0.4, "c": 0.2, "d": 0.1},
        "decisions": {"a": True, "b": False, "c": False, "d": False},
        "ensemble_score": pytest.approx(0.325),
        "ensemble_decision": False,
        "disagreement": pytest.approx(0.5),
        "thresholds": {**THRESHOLDS, "ensemble": 0.5},
    }
    assert type(fields["ensemble_decision"]) is bool and type(fields["probabilities"]["a"]) is float
    assert len(out.rows()) == len(out) == 4
    result = out.to_result(0, "/archive/x.png", size=10)
    assert result.status == "scored" and result.ensemble_decision is True and result.size == 10
    json.dumps(result.to_dict())


# --- devices -------------------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# --- scoring with real networks ------------------------------------------------------------------


def test_score_a_batch(full_ensemble: Ensemble, full_bundle: Bundle) -> None:
    assert full_ensemble.bundle_id == full_bundle.bundle_id
    assert full_ensemble.device == torch.device("cpu") and full_ensemble.precision == "fp32"
    out = full_ensemble.score(xray_like_batch(2))
    assert isinstance(out, ScoreBatch) and len(out) == 2
    assert list(out.probabilities) == list(ARCHITECTURES)
    for probs in out.probabilities.values():
        assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
    assert out.thresholds == {**full_bundle.thresholds, "ensemble": 0.5}
    stacked = np.stack(list(out.probabilities.values()))
    np.testing.assert_allclose(out.ensemble_score, stacked.mean(axis=0))
    np.testing.assert_allclose(out.disagreement, stacked.max(axis=0) - stacked.min(axis=0))


@pytest.mark.slow
def test_a_batch_scores_like_its_images_one_by_one(full_ensemble: Ensemble) -> None:
    batch = xray_like_batch(4, seed=3)
    together = full_ensemble.probabilities(batch)
    for i in range(4):
        alone = full_ensemble.probabilities(batch[i : i + 1])
        for arch in ARCHITECTURES:
            assert abs(together[arch][i] - alone[arch][0]) < 1e-4, arch


def test_networks_are_in_inference_shape(full_ensemble: Ensemble) -> None:
    for model in full_ensemble.networks.values():
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


def test_bad_batches(small_bundle: Bundle) -> None:
    ensemble = Ensemble.from_bundle(small_bundle, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        ensemble.score(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="uint8"):
        ensemble.score(torch.zeros(1, 224, 224, dtype=torch.uint8))
    empty = ensemble.score(torch.zeros(0, 3, 224, 224, dtype=torch.uint8))
    assert len(empty) == 0 and empty.probabilities["resnet18"].shape == (0,)


def test_bf16_on_cpu_stays_close_to_fp32(small_bundle: Bundle) -> None:
    batch = xray_like_batch(2, seed=5)
    fp32 = Ensemble.from_bundle(small_bundle, device="cpu", precision="fp32").probabilities(batch)
    bf16_ensemble = Ensemble.from_bundle(small_bundle, device="cpu", precision="bf16")
    assert bf16_ensemble.precision == "bfloat16"
    bf16 = bf16_ensemble.probabilities(batch)
    worst = max(float(np.abs(fp32[a] - bf16[a]).max()) for a in fp32)
    assert worst <= BF16_TOLERANCE


def test_cpu_precision_defaults_to_fp32_and_refuses_fp16(small_bundle: Bundle) -> None:
    from deepcovid.settings import Settings

    assert Ensemble.from_bundle(small_bundle, "cpu", settings=Settings(cpu_bf16="off")).precision == "fp32"
    assert Ensemble.from_bundle(small_bundle, "cpu", settings=Settings(cpu_bf16="on")).precision == "bfloat16"
    assert Settings(cpu_bf16=False).cpu_bf16 == "off" and Settings(cpu_bf16="TRUE").cpu_bf16 == "on"
    with pytest.raises(ValueError, match="fp16 is only supported on CUDA"):
        Ensemble.from_bundle(small_bundle, "cpu", "fp16")


def test_a_bundle_with_other_preprocessing_is_refused(small_bundle: Bundle, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(small_bundle.path, tmp_path / "b"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["normalization"]["mean"] = [0.5, 0.5, 0.5]
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="normalisation"):
        Ensemble.from_bundle(str(copy), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_matches_fp32(full_bundle: Bundle) -> None:
    batch = xray_like_batch(8, seed=7)
    fp32 = Ensemble.from_bundle(full_bundle, device="cuda", precision="fp32").probabilities(batch)
    half = Ensemble.from_bundle(full_bundle, device="cuda", precision="auto")
    assert half.precision == "float16"
    fp16 = half.probabilities(batch)
    for arch in ARCHITECTURES:
        assert np.abs(fp32[arch] - fp16[arch]).max() < 0.02, arch


# --- bf16 chosen automatically: bf16 instructions and a bundle validated in bf16 ------------------


def _with_bf16_check(bundle: Bundle, out: Path, drift: float) -> Bundle:
    """A copy of ``bundle`` whose validation metrics record a bf16 check with ``drift`` per network."""
    from deepcovid.bundle import load_networks, save_bundle
    from deepcovid.precision import BF16_CHECK_KEY

    metrics = {"validation": {BF16_CHECK_KEY: dict.fromkeys(bundle.architectures, drift)}}
    return save_bundle(out, load_networks(bundle), metrics=metrics)


def test_auto_bf16_needs_bf16_instructions_and_a_validated_bundle(
    small_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from deepcovid import precision as ensemble_module
    from deepcovid.settings import Settings

    auto = Settings(cpu_bf16="auto")
    validated = _with_bf16_check(small_bundle, tmp_path / "validated", 0.004)
    drifting = _with_bf16_check(small_bundle, tmp_path / "drifting", 0.03)

    monkeypatch.setattr(ensemble_module, "cpu_has_native_bf16", lambda: False)
    plain = Ensemble.from_bundle(validated, "cpu", settings=auto)
    assert plain.precision == "fp32" and plain.bf16_drift is None and plain.label == "cpu fp32"

    monkeypatch.setattr(ensemble_module, "cpu_has_native_bf16", lambda: True)
    fast = Ensemble.from_bundle(validated, "cpu", settings=auto)
    assert fast.precision == "bfloat16" and fast.label == "cpu bfloat16" and fast.bf16_drift == 0.004
    with caplog.at_level("INFO", logger="deepcovid.precision"):
        assert Ensemble.from_bundle(drifting, "cpu", settings=auto).precision == "fp32"
        assert Ensemble.from_bundle(small_bundle, "cpu", settings=auto).precision == "fp32"  # never checked
    assert "up to 0.0300 (tolerance 0.0100)" in caplog.text
    assert "records no bf16 check" in caplog.text
    assert (
        Ensemble.from_bundle(
            drifting, "cpu", settings=Settings(cpu_bf16="auto", bf16_tolerance=0.05)
        ).precision
        == "bfloat16"
    )
    # Asked for explicitly, fp32 is what it gets on any CPU; "on" skips the check.
    assert Ensemble.from_bundle(validated, "cpu", "fp32", settings=auto).precision == "fp32"
    assert Ensemble.from_bundle(drifting, "cpu", settings=Settings(cpu_bf16="on")).precision == "bfloat16"


def test_precision_drift_is_zero_in_fp32_and_small_in_bf16(small_bundle: Bundle) -> None:
    from deepcovid.bundle import load_networks
    from deepcovid.precision import precision_drift

    networks = {arch: model.eval() for arch, model in load_networks(small_bundle).items()}
    images = xray_like_batch(6, seed=2)
    drift = precision_drift(networks, images, torch.bfloat16, torch.device("cpu"), batch_size=4)
    assert set(drift) == set(small_bundle.architectures)
    assert all(0 < value <= BF16_TOLERANCE for value in drift.values()), drift
    exact = precision_drift(networks, images, torch.float32, torch.device("cpu"))
    assert all(value == 0.0 for value in exact.values()), exact
