"""The data directory and the embedded SQLite database (URIs: patient data) are private to their owner,
whatever the umask (issue 12, item 9); one that cannot be made or written is one line, and readers still
work on a read-only one (issue 18)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deepcovid.exitcodes import ExitCode
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


# ----------------------------------------------------------------------------------------------------------
# A data dir that cannot be made or written (issue 18, item 4)


def _one_error_line(result, *, code: ExitCode, text: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Make paths read-only for this process: mode bits for a user; for root, whom modes do not stop,
    the immutable attribute (skipped where ``chattr`` cannot set it). Undone afterwards."""
    undo: list[Callable[[], None]] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode & ~0o222)
            undo.append(lambda: path.chmod(mode))
            return
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root and chattr +i is not available here")
        undo.append(lambda: subprocess.run([chattr, "-i", str(path)], check=True))
        assert not os.access(path, os.W_OK)

    yield make
    for step in reversed(undo):
        step()


@pytest.mark.parametrize("where", ["below a file", "/proc"])
def test_commands_that_write_say_a_missing_data_dir_cannot_be_created(
    run_cli, producer_env, tmp_path: Path, tiny_bundle_path: Path, where: str
) -> None:
    if where == "/proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        data_dir = Path("/proc/nope")
    else:
        (tmp_path / "file").write_text("")
        data_dir = tmp_path / "file" / "data"
    producer_env(DEEPCOVID_DATA_DIR=data_dir)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "img.png").write_bytes(xray_png_bytes(64))
    expected = f"error: data dir {data_dir} does not exist and cannot be created ("
    for args in (
        ("screen", archive, "--bundle", tiny_bundle_path),
        ("db", "upgrade"),
        ("bundle", "register", tiny_bundle_path),
        ("bundle", "promote", "ab12"),
        ("jobs",),  # reading needs the database, which cannot exist: the same line
    ):
        result = run_cli(*args)
        _one_error_line(result, code=ExitCode.DATA_DIR_NOT_WRITABLE, text=expected)
        assert "set DEEPCOVID_DATA_DIR to a writable directory" in result.stderr


def test_a_read_only_data_dir_refuses_writers_and_serves_readers(
    run_cli, producer_env, tmp_path: Path, tiny_bundle_path: Path, read_only
) -> None:
    from db.engine import dispose_engines

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        (archive / f"img{i}.png").write_bytes(xray_png_bytes(64, seed=i))
    data_dir = tmp_path / "data"
    assert run_cli("screen", archive, "--bundle", tiny_bundle_path).exit_code == 0
    dispose_engines()  # as when the command ended: the WAL is checkpointed, -wal and -shm removed
    read_only(data_dir / "deepcovid.db")
    read_only(data_dir)

    for args in (
        ("screen", archive),
        ("db", "upgrade"),
        ("bundle", "register", tiny_bundle_path),
    ):
        result = run_cli(*args)
        _one_error_line(
            result,
            code=ExitCode.DATA_DIR_NOT_WRITABLE,
            text=f"error: data dir {data_dir} is not writable: ",
        )

    for args in (
        ("jobs",),
        ("status", "1"),
        ("results", "1"),
        ("results", "1", "--format", "csv"),
        ("audit", archive / "img0.png"),
        ("bundle", "list"),
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, (args, result.output)
    assert str(archive / "img1.png") in run_cli("results", "1", "--format", "csv").stdout
    dispose_engines()
