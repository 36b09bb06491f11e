"""A short real training run on separable synthetic X-rays: it learns, and its thresholds hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import TRAIN_ARCH, TRAIN_EPOCHS
from training.data import load_labelled, split_samples
from training.thresholds import sensitivity_at

pytestmark = pytest.mark.slow


def test_short_run_reaches_high_validation_auc(trained) -> None:
    bundle, args, seconds = trained
    validation = bundle.metrics["validation"]
    print(f"\n{TRAIN_ARCH}: validation AUC {validation['auc']} after {TRAIN_EPOCHS} epochs in {seconds:.0f}s")
    assert bundle.architectures == (TRAIN_ARCH,)
    assert validation["auc"][TRAIN_ARCH] >= 0.95
    assert validation["auc"]["ensemble"] >= 0.95
    provenance = bundle.provenance
    assert provenance["epochs_run"] == {TRAIN_ARCH: TRAIN_EPOCHS}
    assert provenance["counts"]["train"]["covid"] + provenance["counts"]["val"]["covid"] == 20
    assert provenance["patient_split"] is False
    assert provenance["args"]["pretrained"] == "none" and provenance["args"]["finetune"] == "all"
    assert provenance["seed"] == 0 and provenance["torch"]


def test_thresholds_meet_target_on_validation_with_the_worker_scoring(trained) -> None:
    """Re-score the validation split through Ensemble (the worker's path): thresholds still hold."""
    from deepcovid.ensemble import Ensemble
    from training.evaluate import score_samples

    bundle, args, _ = trained
    target = args.target_sensitivity
    for name, op in bundle.metrics["validation"]["operating_points"].items():
        assert op["sensitivity"]["value"] >= target, name

    split = split_samples(load_labelled(args.data), val_fraction=args.val_fraction, seed=args.seed)
    scored = score_samples(Ensemble.from_bundle(bundle, device="cpu", precision="fp32"), split.val)
    assert len(scored.samples) == len(split.val)
    assert (
        sensitivity_at(scored.labels, scored.probabilities[TRAIN_ARCH], bundle.thresholds[TRAIN_ARCH])
        >= target
    )
    assert sensitivity_at(scored.labels, scored.ensemble_scores, bundle.ensemble_threshold) >= target
    assert np.all(scored.ensemble_scores[scored.labels == 1] >= bundle.ensemble_threshold - 1e-6)


def test_imagenet_default_without_weights_fails_clearly(
    training_cli, cli_runner, separable_data: Path, tmp_path: Path, isolated_settings, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("DEEPCOVID_IMAGENET_WEIGHTS_DIR", raising=False)
    out = tmp_path / "never"
    result = cli_runner.invoke(
        training_cli,
        [
            "train",
            str(separable_data),
            "--out",
            str(out),
            "--arch",
            "squeezenet1_1",
            "--epochs",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "not available offline" in result.output and "--pretrained none" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_train_refuses_existing_out_and_bad_arch(
    training_cli, cli_runner, separable_data: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    result = cli_runner.invoke(training_cli, ["train", str(separable_data), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "already exists" in result.output
    result = cli_runner.invoke(
        training_cli, ["train", str(separable_data), "--out", str(tmp_path / "o2"), "--arch", "vgg16"]
    )
    assert result.exit_code == 1 and "unknown architecture" in result.output


def test_the_bundle_records_its_bf16_drift_on_validation_images(trained) -> None:
    """What a CPU worker's automatic bf16 relies on: measured on this bundle's own validation images,
    and equal to re-measuring it on the networks as the worker loads them."""
    import torch

    from deepcovid.bundle import load_networks
    from deepcovid.networks import prepare_network
    from deepcovid.precision import BF16_CHECK_KEY, precision_drift, validated_bf16_drift
    from training.data import decode_samples

    bundle, args, _ = trained
    recorded = bundle.metrics["validation"][BF16_CHECK_KEY]
    assert set(recorded) == {TRAIN_ARCH} and 0 <= recorded[TRAIN_ARCH] < 0.5
    assert validated_bf16_drift(bundle) == recorded[TRAIN_ARCH]

    split = split_samples(load_labelled(args.data), val_fraction=args.val_fraction, seed=args.seed)
    images = decode_samples(split.val).images
    served = {
        arch: prepare_network(model, torch.device("cpu")) for arch, model in load_networks(bundle).items()
    }
    again = precision_drift(
        served,
        images[: args.bf16_check_images],
        torch.bfloat16,
        torch.device("cpu"),
        temperatures=bundle.temperatures,
    )
    assert again[TRAIN_ARCH] == pytest.approx(recorded[TRAIN_ARCH], abs=1e-5)


def test_the_bundle_records_the_temperature_fitted_on_validation(trained) -> None:
    bundle, _, _ = trained
    validation = bundle.metrics["validation"]
    temperature = bundle.temperatures[TRAIN_ARCH]
    assert bundle.manifest["format_version"] == 2 and temperature > 0
    assert validation["temperature"][TRAIN_ARCH] == pytest.approx(temperature, abs=1e-6)
    ece = validation["calibration"][TRAIN_ARCH]
    assert ece["temperature"] == pytest.approx(temperature)


def test_int8_probabilities_of_the_trained_bundle_are_within_tolerance_of_fp32(trained) -> None:
    """``train`` quantized the network, calibrated on its training images; on the validation images the
    worker's int8 path stays within DEEPCOVID_INT8_TOLERANCE of fp32, as the manifest records."""
    pytest.importorskip(
        "openvino", reason="int8 needs the optional engine: pip install 'deepcovid[openvino]'"
    )
    from deepcovid.ensemble import Ensemble
    from deepcovid.settings import Settings
    from training.data import decode_samples

    bundle, args, _ = trained
    drift = bundle.manifest["int8"]["networks"][TRAIN_ARCH]
    settings = Settings(cpu_int8="auto")
    assert drift["max_abs_diff"] <= settings.int8_tolerance
    split = split_samples(load_labelled(args.data), val_fraction=args.val_fraction, seed=args.seed)
    images = decode_samples(split.val).images
    int8 = Ensemble.from_bundle(bundle, device="cpu", settings=settings)
    fp32 = Ensemble.from_bundle(bundle, device="cpu", precision="fp32", settings=settings)
    assert int8.label == "cpu int8"  # the gate passed: drift and AUC change within their limits
    moved = abs(int8.probabilities(images)[TRAIN_ARCH] - fp32.probabilities(images)[TRAIN_ARCH]).max()
    assert moved <= settings.int8_tolerance
    assert moved == pytest.approx(drift["max_abs_diff"], abs=2e-3)
