"""A SQLite file this process cannot write opens read-only (the reading commands then work on an archived
copy); a caller that writes is told up front, in one line with exit 21 (issue 18).

Root writes whatever the mode bits say, so "cannot write" is simulated here by ``os.access`` answering
no, which is what the engine asks; tests/producer/test_data_dir_permissions.py does it for real.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import check_writable, dispose_engines, make_engine, sqlite_path, writer
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode


@pytest.fixture
def migrated(tmp_path: Path) -> str:
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'archived' / 'deepcovid.db'}"
    upgrade(url)
    with writer(make_engine(url)).begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO bundles (bundle_id, manifest, path, registered_at, active) "
            "VALUES ('ab12', '{}', '/x', '2020-01-01 00:00:00', 0)"
        )
    dispose_engines()  # the last connection out checkpoints the WAL and removes -wal and -shm
    return url


@pytest.fixture
def unwritable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Make ``os.access`` deny write access to the given paths, as for a non-root user on a 0555 dir."""
    real = os.access
    denied: set[Path] = set()

    def access(path, mode, *args, **kwargs) -> bool:
        if mode & os.W_OK and Path(path) in denied:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)

    def deny(*paths: Path) -> None:
        denied.update(paths)

    yield deny
    dispose_engines()


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:////data/deepcovid.db") == Path("/data/deepcovid.db")
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg://h/d") is None


def test_read_only_folder_opens_the_file_read_only_and_immutable(migrated: str, unwritable) -> None:
    from db.schema import open_database

    path = sqlite_path(migrated)
    unwritable(path, path.parent)
    engine = open_database(url=migrated)  # reachable and current, without writing anything
    assert engine.url.query["mode"] == "ro" and engine.url.query["immutable"] == "1"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT bundle_id FROM bundles")).scalars().all() == ["ab12"]
    with pytest.raises(sa.exc.OperationalError, match="readonly"), writer(engine).begin() as conn:
        conn.exec_driver_sql("DELETE FROM bundles")
    assert not (path.parent / "deepcovid.db-wal").exists()  # nothing was written beside it either

    with pytest.raises(UserError) as raised:
        open_database(url=migrated, write=True)
    assert raised.value.exit_code is ExitCode.DATA_DIR_NOT_WRITABLE
    assert raised.value.message.startswith(f"database folder {path.parent} is not writable: ")


def test_read_only_file_in_a_writable_folder_opens_read_only(migrated: str, unwritable) -> None:
    path = sqlite_path(migrated)
    unwritable(path)
    engine = make_engine(migrated)
    assert engine.url.query["mode"] == "ro" and "immutable" not in engine.url.query
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM bundles")).scalar() == 1
    with pytest.raises(UserError, match=f"database {path} is not writable") as raised:
        check_writable(migrated)
    assert raised.value.exit_code is ExitCode.DATA_DIR_NOT_WRITABLE


def test_a_writable_file_opens_read_write(migrated: str) -> None:
    engine = make_engine(migrated)
    assert "mode" not in engine.url.query
    check_writable(migrated)
    dispose_engines()


def test_check_writable_names_the_data_dir_and_makes_it_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    check_writable(f"sqlite:///{data_dir / 'deepcovid.db'}", data_dir=data_dir)
    assert data_dir.is_dir() and (data_dir.stat().st_mode & 0o777) == 0o700

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(UserError) as raised:
        check_writable(f"sqlite:///{blocked / 'data' / 'deepcovid.db'}", data_dir=blocked / "data")
    assert raised.value.exit_code is ExitCode.DATA_DIR_NOT_WRITABLE
    assert raised.value.message == (
        f"data dir {blocked / 'data'} does not exist and cannot be created (Not a directory): create it, "
        "or set DEEPCOVID_DATA_DIR to a writable directory"
    )
    check_writable("postgresql+psycopg://h/d")  # a server keeps its own permissions: nothing to check
