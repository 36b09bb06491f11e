"""Migrations build the schema the models describe, go down and up again, and are checked before use."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.engine import make_engine
from db.migrate import current, downgrade, head_revisions, upgrade
from db.models import Base
from db.schema import SchemaNotCurrent, ensure_schema_current

REVIEW_TABLES = {"users", "reviews", "image_reviews", "audit_log"}
TABLES = {
    "scan_jobs",
    "images",
    "job_images",
    "predictions",
    "heatmaps",
    "bundles",
    "publications",
} | REVIEW_TABLES


def _tables(url: str) -> set[str]:
    return set(sa.inspect(make_engine(url)).get_table_names()) - {"alembic_version"}


def test_upgrade_from_empty_matches_models(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    assert _tables(empty_database_url) == TABLES
    assert current(empty_database_url).is_head
    ensure_schema_current(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_base_and_upgrade_again(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "0003")
    assert _tables(empty_database_url) == TABLES - REVIEW_TABLES - {"publications"}
    assert "study_date" not in {
        c["name"] for c in sa.inspect(make_engine(empty_database_url)).get_columns("images")
    }
    downgrade(empty_database_url, "0002")
    assert _tables(empty_database_url) == TABLES - REVIEW_TABLES - {"heatmaps", "publications"}
    downgrade(empty_database_url, "0001")
    assert _tables(empty_database_url) == TABLES - REVIEW_TABLES - {"heatmaps", "job_images", "publications"}
    downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) == set()
    assert current(empty_database_url).current == ()
    upgrade(empty_database_url)
    assert _tables(empty_database_url) == TABLES
    assert set(current(empty_database_url).current) == head_revisions()


def test_upgrade_is_idempotent(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    upgrade(empty_database_url)
    assert current(empty_database_url).is_head


def test_ensure_schema_current_raises_on_empty_database(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    with pytest.raises(SchemaNotCurrent, match="run `deepcovid db upgrade`"):
        ensure_schema_current(engine)


def test_ensure_schema_current_raises_after_downgrade(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    with pytest.raises(SchemaNotCurrent, match="deepcovid db upgrade"):
        ensure_schema_current(make_engine(empty_database_url))


def test_ensure_schema_current_raises_on_unknown_revision(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(SchemaNotCurrent, match="newer"):
        ensure_schema_current(engine)
