"""Every bad source or unreachable service gives its documented exit code and a clear message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepcovid.exitcodes import ExitCode


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "archive"
    path.mkdir()
    (path / "a.png").write_bytes(b"x")
    return path


def test_help_documents_exit_codes(run_cli) -> None:
    result = run_cli("enqueue", "--help")
    assert result.exit_code == 0
    text = flat(result.output)
    for code in (
        "10 source path missing",
        "14 broker unreachable",
        "15 database unreachable",
        "16 no bundle",
    ):
        assert code in text


def test_missing_path(run_cli, producer_env, tmp_path: Path) -> None:
    result = run_cli("enqueue", tmp_path / "nope")
    assert result.exit_code == ExitCode.MISSING_PATH
    assert "no such file or directory" in flat(result.stderr)


def test_path_below_a_file_is_unreadable(run_cli, producer_env, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run_cli("enqueue", tmp_path / "file" / "below")
    assert result.exit_code == ExitCode.UNREADABLE_PATH
    assert "cannot be read" in flat(result.stderr)


def test_a_fifo_is_neither_a_directory_nor_a_file(run_cli, producer_env, archive: Path) -> None:
    os.mkfifo(archive / "pipe.png")
    result = run_cli("enqueue", archive / "pipe.png")
    assert result.exit_code == ExitCode.UNREADABLE_PATH
    assert "is neither a directory nor a regular file" in flat(result.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_unreadable_directory(run_cli, producer_env, archive: Path) -> None:
    producer_env(storage_roots=archive.parent)
    archive.chmod(0)
    try:
        result = run_cli("enqueue", archive)
    finally:
        archive.chmod(0o755)
    assert result.exit_code == ExitCode.UNREADABLE_PATH


def test_no_storage_roots(run_cli, producer_env, archive: Path) -> None:
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.OUTSIDE_STORAGE_ROOTS
    assert "DEEPCOVID_STORAGE_ROOTS" in flat(result.stderr)


def test_outside_storage_roots(run_cli, producer_env, archive: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    producer_env(storage_roots=tmp_path / "elsewhere")
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.OUTSIDE_STORAGE_ROOTS
    assert "is not under the storage roots" in flat(result.stderr)


def test_database_unreachable(run_cli, producer_env, archive: Path, closed_port: int) -> None:
    producer_env(
        storage_roots=archive, database_url=f"postgresql://postgres:secret@127.0.0.1:{closed_port}/x"
    )
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.DATABASE_UNREACHABLE
    text = flat(result.stderr)
    assert "cannot reach the database" in text and "secret" not in text


def test_schema_not_current(run_cli, producer_env, archive: Path, tmp_path: Path) -> None:
    producer_env(storage_roots=archive, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.SCHEMA_NOT_CURRENT
    assert "deepcovid db upgrade" in flat(result.stderr)


def test_no_active_bundle(run_cli, producer_env, archive: Path, migrated_sqlite) -> None:
    producer_env(storage_roots=archive, database_url=migrated_sqlite())
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.NO_BUNDLE
    assert "bundle promote" in flat(result.stderr)
    result = run_cli("enqueue", archive, "--bundle", "abcdef0123456789")
    assert result.exit_code == ExitCode.NO_BUNDLE
    assert "is not registered" in flat(result.stderr)


def test_broker_unreachable(run_cli, producer_env, archive: Path, migrated_sqlite, closed_port: int) -> None:
    import sqlalchemy as sa

    from db.engine import make_engine
    from db.models import BundleRecord

    url = migrated_sqlite()
    with make_engine(url).begin() as conn:
        conn.execute(sa.insert(BundleRecord).values(bundle_id="ab12", manifest={}, path="/x", active=True))
    producer_env(
        storage_roots=archive, database_url=url, broker_url=f"redis://:hunter2@127.0.0.1:{closed_port}/0"
    )
    result = run_cli("enqueue", archive)
    assert result.exit_code == ExitCode.BROKER_UNREACHABLE
    text = flat(result.stderr)
    assert "cannot reach the broker" in text and "hunter2" not in text
    # Nothing was created: the job appears only once every check passed.
    with make_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scan_jobs")).scalar() == 0


def test_empty_source_is_refused_without_a_job(
    run_cli, producer_env, tmp_path: Path, migrated_sqlite, redis_url: str
) -> None:
    import uuid

    import redis
    import sqlalchemy as sa

    from db.engine import make_engine
    from db.models import BundleRecord

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    url = migrated_sqlite()
    with make_engine(url).begin() as conn:
        conn.execute(sa.insert(BundleRecord).values(bundle_id="ab12", manifest={}, path="/x", active=True))
    queue = f"test-empty-{uuid.uuid4().hex[:8]}"
    producer_env(storage_roots=empty, database_url=url, broker_url=redis_url, queue=queue)
    result = run_cli("enqueue", empty)
    assert result.exit_code == 19, result.output
    assert "no images found" in flat(result.stderr) and "skipped 1 file: .txt 1" in flat(result.stderr)
    assert redis.Redis.from_url(redis_url).llen(queue) == 0
    with make_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scan_jobs")).scalar() == 0


def test_prefetch_propagates_errors_and_stops_early() -> None:
    from producer.enqueue import prefetch

    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("disk went away")

    got = []
    with pytest.raises(OSError, match="disk went away"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    assert len(produced) < 10  # bounded look-ahead, and the thread stopped
