"""``deepcovid bundle quantize``: a new bundle with int8 networks, the drift per network and the verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from deepcovid.bundle import load_bundle
from training.synthetic import write_labelled_folder

runner = CliRunner()


def test_quantize_writes_a_new_bundle_and_reports_its_drift(tmp_path: Path) -> None:
    pytest.importorskip(
        "openvino", reason="int8 needs the optional engine: pip install 'deepcovid[openvino]'"
    )
    source = tmp_path / "bundle"
    init = ["bundle", "init", str(source), "--pretrained", "none", "--arch", "squeezenet1_1"]
    assert runner.invoke(app, init).exit_code == 0
    write_labelled_folder(tmp_path / "data", 10, 10, size=96, seed=3)
    args = [
        "bundle",
        "quantize",
        str(source),
        "--calibration",
        str(tmp_path / "data"),
        "--val-fraction",
        "0.5",
    ]

    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    made = load_bundle(tmp_path / "bundle-int8")
    assert made.bundle_id != load_bundle(source).bundle_id and "int8" in made.manifest
    assert f"bundle {made.bundle_id} with int8 networks written to" in done.output
    assert "int8 vs fp32 on validation, squeezenet1_1: up to" in done.output
    assert "CPU workers" in done.output

    again = runner.invoke(app, args)  # the default --out now exists: refused, nothing overwritten
    assert again.exit_code != 0 and "already exists; choose a new --out" in again.output
