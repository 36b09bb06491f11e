"""Settings: environment and .env are read, secrets never printed by `deepcovid config`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from deepcovid.settings import Settings, get_settings, mask_url


def test_environment_and_dotenv_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DEEPCOVID_BATCH_SIZE=7\nDEEPCOVID_QUEUE=from-dotenv\n")
    monkeypatch.setenv("DEEPCOVID_QUEUE", "from-env")
    monkeypatch.setenv("DEEPCOVID_STORAGE_ROOTS", "/a, /b/c ,")
    settings = Settings()
    assert settings.batch_size == 7
    assert settings.queue == "from-env"  # the environment wins over .env
    assert settings.storage_roots == [Path("/a"), Path("/b/c")]


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'deepcovid.db'}"
    assert settings.effective_bundles_dir == tmp_path / "bundles"


def test_mask_url_hides_passwords_only() -> None:
    assert mask_url("postgresql+psycopg://u:pw@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_DATABASE_URL", "postgresql+psycopg://u:db-secret@h/db")
    monkeypatch.setenv("DEEPCOVID_BROKER_URL", "amqp://guest:broker-secret@h:5672//")
    monkeypatch.setenv("DEEPCOVID_S3_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("DEEPCOVID_SECRET_KEY", "session-secret")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["config"], env={"COLUMNS": "200"})
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    for secret in ("db-secret", "broker-secret", "s3-secret", "session-secret"):
        assert secret not in result.output
    assert "DEEPCOVID_BATCH_SIZE" in result.output


def test_heatmaps_and_the_artifact_store_are_settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from deepcovid.settings import HeatmapMode, SettingsError

    assert Settings().heatmaps is HeatmapMode.flagged
    assert Settings(data_dir=tmp_path).effective_artifacts == str(tmp_path / "artifacts")
    monkeypatch.setenv("DEEPCOVID_HEATMAPS", "all")
    monkeypatch.setenv("DEEPCOVID_ARTIFACTS", "s3://maps/deepcovid")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["config"], env={"COLUMNS": "200"})
        monkeypatch.setenv("DEEPCOVID_HEATMAPS", "some")
        get_settings.cache_clear()
        with pytest.raises(SettingsError, match="DEEPCOVID_HEATMAPS=some"):
            get_settings()
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "DEEPCOVID_HEATMAPS" in text and "all" in text and "s3://maps/deepcovid" in text
