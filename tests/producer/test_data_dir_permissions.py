"""The data directory and the embedded SQLite database (URIs: patient data) are private to their owner,
whatever the umask (issue 12, item 9)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.images import xray_png_bytes
from tests.fixtures.services import service_env


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common default umask, under which files are created world-readable."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private(data_dir: Path) -> None:
    assert _mode(data_dir) == 0o700, oct(_mode(data_dir))
    database = data_dir / "deepcovid.db"
    assert _mode(database) == 0o600, oct(_mode(database))
    for extra in ("deepcovid.db-wal", "deepcovid.db-shm"):
        if (data_dir / extra).exists():
            assert _mode(data_dir / extra) == 0o600, (extra, oct(_mode(data_dir / extra)))


def test_db_upgrade_creates_a_private_data_dir(tmp_path: Path, loose_umask: None) -> None:
    data_dir = tmp_path / "fresh" / "data"
    env = service_env(DEEPCOVID_DATA_DIR=str(data_dir))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o022),  # noqa: PLW1509 - the umask under test, set in the child
    )
    assert result.returncode == 0, result.stderr
    _assert_private(data_dir)


def test_screen_creates_a_private_data_dir_and_database(
    run_cli, producer_env, tiny_bundle_path: Path, tmp_path: Path, loose_umask: None
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        (archive / f"img{i}.png").write_bytes(xray_png_bytes(64, seed=i))
    data_dir = tmp_path / "private" / "data"
    producer_env(DEEPCOVID_DATA_DIR=data_dir)
    result = run_cli("screen", archive, "--bundle", tiny_bundle_path, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    # The engine is still open here, so SQLite's -wal and -shm files exist too.
    assert (data_dir / "deepcovid.db-wal").exists()
    _assert_private(data_dir)
