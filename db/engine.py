"""Engines for the results database, tuned so several processes can write at once.

SQLite (the default, a file in ``data_dir``, created 0600 in a 0700 directory) runs in WAL mode with a
busy timeout and foreign keys on every connection; write transactions start with ``BEGIN IMMEDIATE`` so
two writers queue on the lock instead of deadlocking on a read-to-write upgrade. A SQLite file this process
cannot write (or in a folder it cannot write) is opened read-only, so the reading commands work on an
archived copy; commands that write call ``check_writable`` first. PostgreSQL goes through psycopg 3.

Every engine keeps URIs (patient data) out of its errors, which end up in worker logs and Flower: bound
parameters are hidden, and a server error keeps only its first line (PostgreSQL's DETAIL and CONTEXT
lines quote the offending row, e.g. ``Key (uri)=(/archive/DOE^JOHN/...) already exists``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from deepcovid.defaults import SQLITE_BUSY_TIMEOUT_S
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.private import make_private_file, writable_dir
from deepcovid.settings import get_settings

# Execution option that marks a transaction as a writer (``BEGIN IMMEDIATE`` on SQLite).
WRITE_OPTION = "deepcovid_write"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalize_url(url: str | URL) -> URL:
    """Send every PostgreSQL URL through psycopg 3, whatever driver (or none) it names."""
    parsed = make_url(url)
    backend = parsed.drivername.split("+", 1)[0]
    if backend in ("postgresql", "postgres") and parsed.drivername != "postgresql+psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL | None = None) -> Engine:
    """The engine for ``url`` (default: Settings.effective_database_url), cached per URL in this process."""
    if url is None:
        url = get_settings().effective_database_url
    parsed = normalize_url(url)
    parsed = _read_only_url(parsed) or parsed
    key = parsed.render_as_string(hide_password=False)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(parsed)
            _engines[key] = engine
        return engine


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite file URL; None for a server, ``:memory:`` or a ``file:`` URI."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def check_writable(url: str | URL, *, data_dir: Path | None = None) -> None:
    """Before a command writes: a SQLite file's folder is made (private) if missing, and both must be
    writable by this process, else one UserError line (exit 21). A server database keeps its own rules.

    The folder is called the data dir when it is ``data_dir`` (DEEPCOVID_DATA_DIR says where it is).
    """
    path = sqlite_path(url)
    if path is None:
        return
    if data_dir is not None and path.parent == Path(data_dir).expanduser():
        what, elsewhere = "data dir", "set DEEPCOVID_DATA_DIR to a writable directory"
    else:
        what, elsewhere = "database folder", "use a database URL in a writable directory"
    writable_dir(path.parent, what=what, elsewhere=elsewhere)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(
            ExitCode.DATA_DIR_NOT_WRITABLE,
            f"database {path} is not writable: let this user write to it (e.g. `chmod u+w {path}` as its "
            f"owner), or {elsewhere}",
        )


def _read_only_url(url: URL) -> URL | None:
    """The read-only form of a SQLite file URL when this process cannot write the file or its folder."""
    path = sqlite_path(url)
    if path is None or not path.is_file():
        return None
    folder_writable = os.access(path.parent, os.W_OK)
    if folder_writable and os.access(path, os.W_OK):
        return None
    query = {"mode": "ro", "uri": "true"}
    if not folder_writable and not path.with_name(path.name + "-wal").exists():
        # A WAL reader needs a -shm file it cannot create here; with no -wal, no writer is active.
        query["immutable"] = "1"
    return url.set(database="file:" + quote(str(path)), query=query)


def writer(engine: Engine) -> Engine:
    """The same engine, marked so its transactions take the write lock up front on SQLite."""
    return engine.execution_options(**{WRITE_OPTION: True})


def dispose_engines() -> None:
    """Close every cached engine's pool (tests, and before dropping a database)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = _create_sqlite_engine(url)
    else:
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
        if url.get_backend_name() == "postgresql":
            # JIT compiling a bulk upsert (its CTE joins look costly to the planner) took longer than the
            # statement itself: 0.55 s of 0.87 s for 5,000 registered images.
            kwargs["connect_args"] = {"application_name": "deepcovid", "options": "-c jit=off"}
        engine = sa.create_engine(url, **kwargs)
    event.listen(engine, "handle_error", _first_line_only)
    return engine


def _first_line_only(context: sa.engine.ExceptionContext) -> None:
    """Cut the driver's message to its first line, in the driver's exception and SQLAlchemy's alike."""
    original = context.original_exception
    text = str(original)
    first = text.splitlines()[0] if text else ""
    if first == text:
        return
    original.args = (first,)
    wrapped = context.sqlalchemy_exception
    if wrapped is not None:
        # SQLAlchemy built its message from the driver's: "(module.Class) <driver message>".
        wrapped.args = (f"({type(original).__module__}.{type(original).__name__}) {first}",)


def _create_sqlite_engine(url: URL) -> Engine:
    path = sqlite_path(url)
    if path is not None and not path.exists():
        # Before SQLite creates it: its -wal and -shm files then take the same 0600 mode.
        check_writable(url)  # makes the folder, or says in one line why it cannot
        make_private_file(path)
    read_only = url.query.get("mode") == "ro"
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN instead of pysqlite's implicit, deferred one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if not read_only:  # the file says which journal it has; a reader cannot change it
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        mode = "IMMEDIATE" if connection.get_execution_options().get(WRITE_OPTION) else "DEFERRED"
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _after_fork_in_child() -> None:
    # Pooled connections belong to the parent: forget them without closing the shared sockets.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def describe(engine: Engine) -> str:
    """The engine's URL with any password hidden, for messages."""
    return engine.url.render_as_string(hide_password=True)
