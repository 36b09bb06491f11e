"""Run the Alembic migrations shipped inside the package (no alembic.ini needed, works when installed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Engine

from db.engine import make_engine, writer

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic Config pointing at db/migrations; env.py takes the engine from ``attributes``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revisions() -> set[str]:
    return set(_script().get_heads())


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def upgrade(url: str | URL | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: the configured one) up to ``revision``."""
    _run(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str | URL | None, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (e.g. ``-1`` or ``base``)."""
    _run(url, lambda config: command.downgrade(config, revision))


@dataclass(frozen=True)
class SchemaStatus:
    current: tuple[str, ...]
    heads: tuple[str, ...]

    @property
    def is_head(self) -> bool:
        return set(self.current) == set(self.heads)


def current(url: str | URL | None = None) -> SchemaStatus:
    """The revision(s) the database is at and the newest this code ships."""
    engine = make_engine(url)
    with engine.connect() as connection:
        revisions = MigrationContext.configure(connection).get_current_heads()
    return SchemaStatus(current=tuple(sorted(revisions)), heads=tuple(sorted(head_revisions())))


def _run(url: str | URL | None, action: Callable[[Config], None]) -> None:
    engine = make_engine(url)
    action(alembic_config(writer(engine)))
