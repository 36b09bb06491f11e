"""The schema's tables as Core objects, and the conditions and upsert construct that reads and writes share.

Bulk statements are written in SQLAlchemy Core over these tables; the ORM classes stay in ``db.models``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from db.models import BundleRecord, Heatmap, Image, JobImage, Prediction, ScanJob

images = Image.__table__
predictions = Prediction.__table__
scan_jobs = ScanJob.__table__
job_images = JobImage.__table__
bundles = BundleRecord.__table__
heatmaps = Heatmap.__table__


def uri_in(dialect: str, uris: Sequence[str]) -> sa.ColumnElement[bool]:
    """``images.uri IN (...)``; on PostgreSQL one array parameter (``= ANY``) rather than thousands."""
    if dialect == "postgresql":
        return images.c.uri == sa.any_(
            sa.bindparam("uris", value=list(uris), type_=postgresql.ARRAY(sa.Text))
        )
    return images.c.uri.in_(uris)


def uri_batches(dialect: str, uris: Sequence[str], size: int) -> Iterator[sa.ColumnElement[bool]]:
    """``uri_in`` over the distinct URIs, ``size`` at a time: statements stay small whatever the list."""
    unique = list(dict.fromkeys(uris))
    for start in range(0, len(unique), size):
        yield uri_in(dialect, unique[start : start + size])


def dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert`` construct, the one that offers ``on_conflict_do_update``."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"upserts are written for SQLite and PostgreSQL, not {dialect}")
