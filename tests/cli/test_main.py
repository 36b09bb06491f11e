"""The command line's start-up: version, settings checked before any command, confirmation of data loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from deepcovid.bundle import load_bundle
from deepcovid.settings import get_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("deepcovid-screen ")


@pytest.mark.parametrize("command", [["jobs"], ["config"], ["db", "current"]])
def test_a_bad_setting_is_one_line_and_exit_4(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.setenv("DEEPCOVID_DEVICE", "cdua")
    result = runner.invoke(app, command)
    assert result.exit_code == 4, result.output
    assert "DEEPCOVID_DEVICE=cdua is not allowed" in result.stderr and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help_works_whatever_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_CHUNK_SIZE", "25O")
    assert runner.invoke(app, ["--help"]).exit_code == 0
    assert runner.invoke(app, ["screen", "--help"]).exit_code == 0


def test_an_unknown_variable_is_a_warning_naming_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_CHUNKSIZE", "3")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert "DEEPCOVID_CHUNKSIZE is not a deepcovid setting" in result.stderr
    assert "did you mean DEEPCOVID_CHUNK_SIZE?" in result.stderr


def test_downgrade_asks_first(tmp_path: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    refused = runner.invoke(app, ["db", "downgrade", "--", "-1"], input="n\n")
    assert refused.exit_code == 2 and "nothing changed" in refused.stderr
    assert runner.invoke(app, ["db", "current"]).exit_code == 0  # still at head
    done = runner.invoke(app, ["db", "downgrade", "--yes", "--", "-1"])
    assert done.exit_code == 0 and "at revision 0004" in done.stdout  # one below the head


def test_bundle_list(tiny_bundle_path: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    empty = runner.invoke(app, ["bundle", "list"])
    assert empty.exit_code == 0 and "no bundle is registered" in empty.stderr
    assert runner.invoke(app, ["bundle", "register", str(tiny_bundle_path), "--promote"]).exit_code == 0
    listed = runner.invoke(app, ["bundle", "list"], env={"COLUMNS": "250"})
    bundle_id = load_bundle(tiny_bundle_path).bundle_id
    assert listed.exit_code == 0 and bundle_id in listed.stdout and "active" in listed.stdout


def test_out_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    target = tmp_path / "no-such-folder" / "results.csv"
    result = runner.invoke(app, ["results", "1", "--format", "csv", "--out", str(target)])
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.stderr and "Traceback" not in result.output
