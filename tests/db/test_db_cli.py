"""`deepcovid db upgrade / downgrade / current`, and the clean exit 3 when the schema is not current."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from cli.render import guarded
from db import schema
from db.migrate import current
from deepcovid.exitcodes import ExitCode

SCHEMA_EXIT_CODE = ExitCode.SCHEMA_NOT_CURRENT


def open_database(url: str):
    """The database opener as every command runs it: a UserError becomes one line and its exit code."""
    return guarded(schema.open_database)(url=url)


@pytest.fixture
def cli() -> typer.Typer:
    """The real command line: its `db` group."""
    return app


def test_current_upgrade_downgrade(cli: typer.Typer, empty_database_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["db", "current", "--url", empty_database_url])
    assert result.exit_code == SCHEMA_EXIT_CODE
    assert "deepcovid db upgrade" in result.output

    result = runner.invoke(cli, ["db", "upgrade", "--url", empty_database_url])
    assert result.exit_code == 0, result.output
    assert current(empty_database_url).is_head

    result = runner.invoke(cli, ["db", "current", "--url", empty_database_url])
    assert result.exit_code == 0 and "up to date" in result.output

    result = runner.invoke(cli, ["db", "downgrade", "--yes", "--url", empty_database_url, "--", "-1"])
    assert result.exit_code == 0, result.output
    assert current(empty_database_url).current == ("0004",)  # one below the head

    result = runner.invoke(cli, ["db", "upgrade", "--revision", "0005", "--url", empty_database_url])
    assert result.exit_code == 0, result.output
    assert current(empty_database_url).current == ("0005",)


def test_upgrade_uses_settings(cli: typer.Typer, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepcovid.settings import get_settings

    monkeypatch.setenv("DEEPCOVID_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert current(sqlite_url).is_head
    finally:
        get_settings.cache_clear()


def test_open_database_exits_3_with_a_clean_message(
    empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit) as exc_info:
        open_database(empty_database_url)
    assert exc_info.value.exit_code == SCHEMA_EXIT_CODE
    assert "run `deepcovid db upgrade`" in capsys.readouterr().err


def test_open_database_returns_engine_when_current(migrated_url: str) -> None:
    engine = open_database(migrated_url)
    assert engine.dialect.name in ("sqlite", "postgresql")
