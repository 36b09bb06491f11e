"""Validation by group: `evaluate --by COLUMN`, `train --test-where COLUMN=VALUE`, the shortcut probe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.fixtures.images import write_labelled_folder


def _csv_with_sites(folder: Path, *, patients: bool = False) -> Path:
    """labels.csv over a labelled folder, alternating images between sites A and B (with ``patients``,
    two images per patient, both at one site)."""
    path = folder / "labels.csv"
    rows = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "site", "patient_id"])
        for i, name in enumerate(rows):
            site = "AB"[(i // 2) % 2 if patients else i % 2]
            writer.writerow([name, name.split("/")[0], site, f"p{i // 2 if patients else i}"])
    return path


def test_evaluate_by_column_reports_each_group_and_the_shortcut_probe(
    trained, separable_data: Path, tmp_path: Path, training_cli, cli_runner
) -> None:
    bundle, _, _ = trained
    labels = _csv_with_sites(separable_data)
    out = tmp_path / "report"
    result = cli_runner.invoke(
        training_cli,
        ["evaluate", str(bundle.path), str(labels), "--out", str(out), "--device", "cpu", "--no-db"]
        + ["--bootstrap", "100", "--by", "site"],
    )
    assert result.exit_code == 0, result.output
    assert "Ensemble by site" in result.output and "Shortcut probe" in result.output
    by = json.loads((out / "metrics.json").read_text())["by"]
    assert by["column"] == "site" and [g["value"] for g in by["groups"]] == ["A", "B"]
    for group in by["groups"]:
        assert group["n"] == 20 and group["n_covid"] == 10
        low, high = group["sensitivity"]["wilson"]
        assert low <= group["sensitivity"]["value"] <= high
        assert group["roc_auc"]["ci_low"] <= group["roc_auc"]["auc"] <= group["roc_auc"]["ci_high"]
    probe = by["probe"]["networks"]["resnet18"]
    # The sites were assigned alternately: nothing in the images tells them apart, the label does.
    assert probe["column_auc"] < 0.8 and probe["label_auc"] > 0.8
    assert set(probe["column_auc_within_class"]) == {"covid", "non_covid"}
    report = (out / "report.md").read_text()
    assert "## By site" in report and "Shortcut probe" in report


def test_evaluate_by_an_unknown_column_is_refused_before_scoring(
    trained, separable_data: Path, tmp_path: Path, training_cli, cli_runner
) -> None:
    bundle, _, _ = trained
    labels = _csv_with_sites(separable_data)
    result = cli_runner.invoke(
        training_cli,
        ["evaluate", str(bundle.path), str(labels), "--out", str(tmp_path / "r"), "--no-db", "--by", "sex"],
    )
    assert result.exit_code != 0
    assert "no column 'sex'" in result.output and "site" in result.output
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_test_where_holds_out_a_whole_group_and_bf16_falls_back_when_validation_disagrees_with_ema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, training_cli, cli_runner
) -> None:
    from deepcovid.bundle import load_bundle
    from training import train as train_module

    data = tmp_path / "data"
    write_labelled_folder(data, 12, 12, size=48, seed=21)
    labels = _csv_with_sites(data, patients=True)
    # Every bf16 validation AUC "disagrees": the run must go on in fp32 and say so.
    monkeypatch.setattr(train_module, "BF16_AUC_TOLERANCE", -1.0)
    out = tmp_path / "bundle"
    result = cli_runner.invoke(
        training_cli,
        ["train", str(labels), "--out", str(out), "--arch", "squeezenet1_1", "--pretrained", "none"]
        + ["--epochs", "2", "--batch-size", "8", "--device", "cpu", "--no-progress", "--precision", "bf16"]
        + ["--test-where", "site=B", "--cache-dir", str(tmp_path / "cache"), "--bf16-check-images", "0"]
        + ["--ema", "0.9"],  # the bundle keeps the average of the weights
    )
    assert result.exit_code == 0, result.output
    assert "trained squeezenet1_1 in fp32 (bf16 - fp32 validation AUC up to" in result.output
    provenance = load_bundle(out).provenance
    assert provenance["counts"]["test"] == {"covid": 6, "non_covid": 6}
    assert sum(provenance["counts"]["train"].values()) + sum(provenance["counts"]["val"].values()) == 12
    test_set = (tmp_path / "bundle.report" / "test_set.csv").read_text()
    assert test_set.count("\n") == 13
    history = provenance["history"]["squeezenet1_1"]
    assert history[0]["precision"] == "bf16" and history[0]["bf16_fallback"] and "bf16_auc_gap" in history[0]
    assert history[1]["precision"] == "fp32" and "bf16_auc_gap" not in history[1]
    assert provenance["training_precision"] == {"squeezenet1_1": "fp32"}
    assert provenance["args"]["recipe"] == "scratch" and provenance["args"]["ema"] == 0.9


def test_test_where_needs_a_known_column_and_value(tmp_path: Path) -> None:
    from training.data import DataError, hold_out_group, load_labelled

    data = tmp_path / "data"
    write_labelled_folder(data, 3, 3, size=32, seed=2)
    samples = load_labelled(_csv_with_sites(data))
    with pytest.raises(DataError, match="no column 'view'"):
        hold_out_group(samples, "view=PA")
    with pytest.raises(DataError, match="no row has site = 'C'"):
        hold_out_group(samples, "site=C")
    held, rest = hold_out_group(samples, "site = A")
    assert len(held) == 3 and {s.column("site") for s in rest} == {"B"}
