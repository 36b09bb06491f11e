"""Alembic environment: runs online against the engine db.migrate hands over (or the configured URL)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from db.engine import make_engine, writer
from db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or writer(make_engine(config.get_main_option("sqlalchemy.url")))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode copies a table and drops the old one: with foreign keys enforced, dropping
            # ``images`` would cascade into every prediction. Settable only outside a transaction.
            _foreign_keys(connection, "OFF")
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,  # SQLite alters tables by copying them
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if sqlite:
                _foreign_keys(connection, "ON")


def _foreign_keys(connection: sa.Connection, value: str) -> None:
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys = {value}")


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `deepcovid db upgrade`")
run_migrations_online()
