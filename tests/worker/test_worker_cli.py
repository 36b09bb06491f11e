"""`deepcovid worker`: the celery command line it runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


def test_worker_command_builds_the_celery_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app
    from deepcovid.settings import get_settings

    monkeypatch.setenv("DEEPCOVID_QUEUE", "screening")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            app, ["worker", "--dry-run", "--pool", "solo", "-n", "gpu0@%h", "-c", "1"]
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    words = result.output.split()
    assert words[1:6] == ["-m", "celery", "-A", "worker", "worker"]
    assert " -Q screening --pool solo " in result.output
    assert "-n gpu0@%h" in result.output and "--concurrency 1" in result.output and "-E" in words


def test_a_worker_whose_artifact_store_lies_in_the_archive_does_not_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from cli.main import app
    from deepcovid.settings import get_settings

    monkeypatch.setenv("DEEPCOVID_STORAGE_ROOTS", str(tmp_path))
    monkeypatch.setenv("DEEPCOVID_ARTIFACTS", str(tmp_path / "heatmaps"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["worker", "--dry-run"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 4, result.output
    assert "DEEPCOVID_STORAGE_ROOTS" in result.output and "celery" not in result.output
