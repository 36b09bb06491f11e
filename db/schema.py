"""Opening the results database: reachable, and at the schema this code was written for.

Every role (commands, workers, training's registry) opens the database through ``open_database``, so
each sees the same clear error, with its exit code, when the server is down or migrations are due.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from db.engine import check_writable, describe, make_engine, sqlite_path
from db.migrate import head_revisions, known_revisions, upgrade
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import Settings, get_settings, mask_url

# Alembic says which dialect it drives at INFO each time a migration context opens: noise in every
# command's and worker's log when all that happens is a version check.
ALEMBIC_LOGGER = "alembic.runtime.migration"


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class SchemaNotCurrent(UserError):
    """The database schema is missing or older/newer than this code: migrations must run first."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.SCHEMA_NOT_CURRENT, message)


class DatabaseUnreachable(UserError):
    """The database server cannot be reached, or refuses these credentials."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.DATABASE_UNREACHABLE, message)


def open_database(
    settings: Settings | None = None, *, url: str | None = None, create: bool = False, write: bool = False
) -> Engine:
    """The results database, reachable and at the newest schema: the one way every role opens it.

    ``url`` defaults to the settings' database. With ``create``, the embedded SQLite default (no
    ``DEEPCOVID_DATABASE_URL``) is created and migrated on first use, as ``screen`` needs on a fresh box.
    ``write`` (implied by ``create``) says the caller writes: a SQLite file or folder it cannot write is
    then one line and exit 21 up front; otherwise such a file opens read-only, for the reading commands.
    Raises DatabaseUnreachable, SchemaNotCurrent or that UserError, whose messages say what to do.
    """
    settings = settings or get_settings()
    embedded = url is None and not (settings.database_url and settings.database_url.get_secret_value())
    url = url or settings.effective_database_url
    path = sqlite_path(url)
    if create or write or (path is not None and not path.exists()):  # the engine would make the file
        check_writable(url, data_dir=settings.data_dir)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:  # reachable? (and, only when it may be made here, empty?)
            fresh = create and embedded and not sa.inspect(conn).get_table_names()
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise DatabaseUnreachable(f"cannot reach the database {mask_url(str(url))}: {reason}") from None
    if fresh:
        upgrade(url)
    ensure_schema_current(engine)
    return engine


def ensure_schema_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at the newest migration this code ships."""
    heads = head_revisions()
    try:
        with engine.connect() as connection, _quiet(ALEMBIC_LOGGER):
            current = set(MigrationContext.configure(connection).get_current_heads())
    except sa.exc.OperationalError as exc:
        raise SchemaNotCurrent(
            f"cannot read the schema version of {describe(engine)}: {exc.orig}; "
            "check DEEPCOVID_DATABASE_URL, then run `deepcovid db upgrade`"
        ) from exc
    if current == heads:
        return
    if not current:
        raise SchemaNotCurrent(
            f"the database {describe(engine)} has no schema yet: run `deepcovid db upgrade`"
        )
    found = ", ".join(sorted(current))
    wanted = ", ".join(sorted(heads))
    if current - known_revisions():
        raise SchemaNotCurrent(
            f"the database {describe(engine)} is at schema revision {found}, newer than this code "
            f"({wanted}): upgrade deepcovid on this machine, or run `deepcovid db upgrade` with the newer one"
        )
    raise SchemaNotCurrent(
        f"the database {describe(engine)} is at schema revision {found}, this code needs {wanted}: "
        "run `deepcovid db upgrade`"
    )
