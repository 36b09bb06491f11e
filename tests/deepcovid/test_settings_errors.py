"""A bad or misspelt DEEPCOVID_* variable is named in one line, never a pydantic traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepcovid.exitcodes import ExitCode
from deepcovid.settings import SettingsError, get_settings, unknown_variables


@pytest.fixture(autouse=True)
def _fresh_settings() -> None:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("DEEPCOVID_CHUNK_SIZE", "25O", "valid integer"),
        ("DEEPCOVID_DEVICE", "cdua", "auto, cpu, cuda or cuda:N"),
        ("DEEPCOVID_CPU_BF16", "sometimes", "'auto', 'on' or 'off'"),
    ],
)
def test_an_invalid_value_names_the_variable_the_value_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert caught.value.exit_code is ExitCode.BAD_SETTING
    message = caught.value.message
    assert f"{name}={value}" in message and allowed in message and "\n" not in message


def test_devices_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_DEVICE", " CUDA:1 ")
    assert get_settings().device == "cuda:1"


def test_unknown_variables_are_found_with_the_closest_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DEEPCOVID_STORAGE_ROOT=/archive\nOTHER=1\n", encoding="utf-8")
    environ = {"DEEPCOVID_CHUNKSIZE": "3", "DEEPCOVID_QUEUE": "q", "DEEPCOVID_ZZZ": "1", "PATH": "/bin"}
    assert unknown_variables(environ, env_file) == [
        ("DEEPCOVID_CHUNKSIZE", "DEEPCOVID_CHUNK_SIZE"),
        ("DEEPCOVID_STORAGE_ROOT", "DEEPCOVID_STORAGE_ROOTS"),
        ("DEEPCOVID_ZZZ", None),
    ]
