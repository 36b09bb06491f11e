"""``bundle show`` read by people: thresholds and metrics rounded, the manifest's JSON at full precision."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.slow  # writes a bundle (torch)


def test_bundle_show_rounds_thresholds_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from deepcovid.bundle import save_bundle
    from deepcovid.networks import build_network

    monkeypatch.setenv("COLUMNS", "80")
    torch.manual_seed(0)
    networks = {"squeezenet1_1": build_network("squeezenet1_1", pretrained="none")}
    metrics = {"validation": {"auc": {"squeezenet1_1": 2 / 3}}, "operating": {"sensitivity": 1 / 3}}
    bundle = save_bundle(
        tmp_path / "b",
        networks,
        thresholds={"squeezenet1_1": 0.123456789},
        ensemble_threshold=1 / 3,
        metrics=metrics,
    )
    shown = CliRunner().invoke(app, ["bundle", "show", str(bundle.path)])
    assert shown.exit_code == 0, shown.output
    text = re.sub(r"\d\d:\d\d:\d\d\.\d+", "", shown.stdout)  # the creation time's seconds are not a float
    assert not re.search(r"\d\.\d{4,}", text), text
    assert "threshold 0.123" in text and "threshold 0.333" in text
    assert '{"auc": {"squeezenet1_1": 0.667}}' in " ".join(text.split()).replace("│ ", "").replace(" │", "")
    as_json = json.loads(CliRunner().invoke(app, ["bundle", "show", str(bundle.path), "--json"]).stdout)
    assert as_json["thresholds"]["squeezenet1_1"] == 0.123456789
    assert as_json["metrics"]["operating"]["sensitivity"] == 1 / 3


def test_bundle_show_lists_each_networks_temperature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from deepcovid.bundle import save_bundle
    from deepcovid.networks import build_network

    monkeypatch.setenv("COLUMNS", "120")
    torch.manual_seed(0)
    networks = {"squeezenet1_1": build_network("squeezenet1_1", pretrained="none")}
    bundle = save_bundle(tmp_path / "b", networks, temperatures={"squeezenet1_1": 2.345678})
    shown = CliRunner().invoke(app, ["bundle", "show", str(bundle.path)])
    assert shown.exit_code == 0, shown.output
    assert "squeezenet1_1  threshold 0.500  temperature 2.346" in shown.stdout
    as_json = json.loads(CliRunner().invoke(app, ["bundle", "show", str(bundle.path), "--json"]).stdout)
    assert as_json["temperature"] == {"squeezenet1_1": 2.345678} and as_json["format_version"] == 2
