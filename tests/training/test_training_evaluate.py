"""`deepcovid evaluate`: every report file, the same data id for the same images, recorded in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepcovid.results import ENSEMBLE_KEY as ENSEMBLE
from training.data import data_id, load_labelled
from training.report import plot_names

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_evaluate_writes_report_and_records_metrics(
    trained,
    heldout_data: Path,
    tmp_path: Path,
    training_cli,
    cli_runner,
    configured_database,
    isolated_settings,
) -> None:
    from db.registry import active_bundle, get_bundle

    bundle, _, _ = trained
    out = tmp_path / "report"
    result = cli_runner.invoke(
        training_cli,
        [
            "evaluate",
            str(bundle.path),
            str(heldout_data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--bootstrap",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output

    for name in ["report.md", "metrics.json", *plot_names([*bundle.architectures, ENSEMBLE])]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bundle_id"] == bundle.bundle_id
    assert metrics["eval_data_id"] == data_id(load_labelled(heldout_data))
    assert metrics["n_scored"] == 16 and metrics["counts"] == {"covid": 8, "non_covid": 8}
    ensemble = metrics["ensemble"]
    assert ensemble["operating_point"]["threshold"] == pytest.approx(bundle.ensemble_threshold)
    assert [r["threshold"] for r in ensemble["table"] if not r["operating"]] == pytest.approx(
        [i / 10 for i in range(1, 10)]
    )
    assert ensemble["roc_auc"]["ci_low"] <= ensemble["roc_auc"]["auc"] <= ensemble["roc_auc"]["ci_high"]
    assert metrics["operating"]["sensitivity"] == ensemble["operating_point"]["sensitivity"]["value"]

    report = (out / "report.md").read_text()
    assert "| threshold | sensitivity (95% CI) | specificity (95% CI) |" in report
    assert "(operating)" in report and "not for clinical use" in report and "±" in report

    # Calibration: the bundle's temperatures, the reliability diagram, and the ECE before and after.
    assert metrics["temperatures"] == bundle.temperatures
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Reliability](reliability.png)" in report
    assert "| scorer | temperature | ECE before | ECE after |" in report
    for name in [*bundle.architectures, ENSEMBLE]:
        ece = metrics["calibration"][name]
        assert 0 <= ece["ece_before"] <= 1 and 0 <= ece["ece_after"] <= 1
        assert f"{ece['ece_before']:.3f} | {ece['ece_after']:.3f} |" in report

    # Where the networks looked: a gallery with opaque names, heatmap mass per class on a capped sample.
    heatmaps = metrics["heatmaps"]
    assert heatmaps["gallery"] and heatmaps["sample_per_class"] == 32
    for entry in heatmaps["gallery"]:
        assert entry["kind"] in ("tp", "fp", "fn") and entry["file"] in report
        assert (out / entry["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {sample.path.stem for sample in load_labelled(heldout_data)}
    assert not any(name in path.name for path in (out / "gallery").iterdir() for name in names)
    for label in ("covid", "non_covid"):
        mass = heatmaps["mass"][label]
        assert mass["n"] == 8 and 0 <= mass["top_corners"] <= mass["border"] <= 1
    assert "## Where the networks looked (Grad-CAM)" in report and "| class | images | border |" in report

    # Recorded against the bundle, which evaluate registered (but did not activate).
    record = get_bundle(configured_database, bundle.bundle_id)
    stored = record.metrics["evaluations"][metrics["eval_data_id"]]
    assert stored["operating"]["sensitivity"] == metrics["operating"]["sensitivity"]
    assert (isolated_settings / bundle.bundle_id / "manifest.json").is_file()
    assert active_bundle(configured_database) is None


def test_evaluate_without_database_and_with_a_broken_image(
    trained, heldout_data: Path, tmp_path: Path, training_cli, cli_runner
) -> None:
    import shutil

    bundle, _, _ = trained
    data = tmp_path / "data"
    shutil.copytree(heldout_data, data)
    (data / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "report"
    result = cli_runner.invoke(
        training_cli,
        [
            "evaluate",
            str(bundle.path),
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-db",
            "--bootstrap",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 17 and metrics["n_scored"] == 16
    assert sum(metrics["failed"].values()) == 1
