"""Fixtures for the producer tests: an isolated environment and a CLI runner."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

ENV_KEYS = (
    "DEEPCOVID_DATA_DIR",
    "DEEPCOVID_DATABASE_URL",
    "DEEPCOVID_BROKER_URL",
    "DEEPCOVID_QUEUE",
    "DEEPCOVID_STORAGE_ROOTS",
    "DEEPCOVID_S3_ENDPOINT_URL",
    "DEEPCOVID_S3_ACCESS_KEY_ID",
    "DEEPCOVID_S3_SECRET_ACCESS_KEY",
    "DEEPCOVID_BUNDLES_DIR",
    "DEEPCOVID_DEVICE",
    "DEEPCOVID_DECODE_THREADS",
    "DEEPCOVID_CHUNK_SIZE",
)


@pytest.fixture
def producer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Point DEEPCOVID_* at a private data dir; call it with NAME=value to set more variables."""
    from deepcovid.settings import get_settings

    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEEPCOVID_DEVICE", "cpu")
    monkeypatch.setenv("DEEPCOVID_DECODE_THREADS", "2")
    get_settings.cache_clear()

    def set_env(**values: object) -> None:
        for key, value in values.items():
            name = key if key.startswith("DEEPCOVID_") else f"DEEPCOVID_{key.upper()}"
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()


@pytest.fixture
def run_cli() -> Callable[..., object]:
    """Run ``deepcovid ARGS...`` in-process; returns click's Result (exit_code, stdout, stderr, output)."""
    from cli.main import app

    runner = CliRunner()

    def run(*args: str) -> object:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    return run


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> Callable[[str], str]:
    """Factory: the URL of a new SQLite database at the newest schema."""
    from db.engine import dispose_engines
    from db.migrate import upgrade

    def make(name: str = "results.db") -> str:
        url = f"sqlite:///{tmp_path / name}"
        upgrade(url)
        return url

    yield make
    dispose_engines()


@pytest.fixture
def producer_pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database at the newest schema, dropped afterwards."""
    import uuid

    import psycopg

    from db.engine import dispose_engines
    from db.migrate import upgrade

    admin = "postgresql://postgres@127.0.0.1:5432/test"
    name = f"deepcovid_producer_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not available on 127.0.0.1:5432: {exc}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        dispose_engines()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
