"""The bundle registry: which model bundles exist, how they evaluated, and the one that is active.

Records come back detached (plain attribute access, no session needed).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.engine import writer
from db.models import BundleRecord, utcnow
from db.tables import bundles, dialect_insert


class UnknownBundle(LookupError):
    """No registered bundle has this id."""


def register_bundle(
    engine: Engine,
    *,
    bundle_id: str,
    manifest: dict[str, Any],
    path: str,
    metrics: dict[str, Any] | None = None,
) -> BundleRecord:
    """Add a bundle (or refresh its manifest and path); registering twice is harmless."""
    with writer(engine).begin() as conn:
        stmt = dialect_insert(conn.dialect.name)(bundles).values(
            bundle_id=bundle_id,
            manifest=manifest,
            path=str(path),
            metrics=metrics,
            registered_at=utcnow(),
            active=False,
        )
        refreshed = {"manifest": stmt.excluded.manifest, "path": stmt.excluded.path}
        if metrics is not None:
            refreshed["metrics"] = stmt.excluded.metrics
        conn.execute(stmt.on_conflict_do_update(index_elements=[bundles.c.bundle_id], set_=refreshed))
    return get_bundle(engine, bundle_id)


def record_evaluation(engine: Engine, bundle_id: str, metrics: dict[str, Any]) -> None:
    """Store a bundle's evaluation metrics (sensitivity, specificity, AUC... as JSON)."""
    with writer(engine).begin() as conn:
        updated = conn.execute(
            sa.update(bundles).where(bundles.c.bundle_id == bundle_id).values(metrics=metrics)
        ).rowcount
    if not updated:
        raise UnknownBundle(f"bundle {bundle_id} is not registered")


def get_bundle(engine: Engine, bundle_id: str) -> BundleRecord:
    """The registered bundle ``bundle_id``; raises UnknownBundle."""
    with Session(engine, expire_on_commit=False) as session:
        record = session.get(BundleRecord, bundle_id)
    if record is None:
        raise UnknownBundle(f"bundle {bundle_id} is not registered")
    return record


def active_bundle(engine: Engine) -> BundleRecord | None:
    """The bundle new jobs use by default, if one was promoted."""
    with Session(engine, expire_on_commit=False) as session:
        return session.scalars(sa.select(BundleRecord).where(BundleRecord.active.is_(True))).one_or_none()


def list_bundles(engine: Engine) -> list[BundleRecord]:
    """Every registered bundle, oldest first."""
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(sa.select(BundleRecord).order_by(BundleRecord.registered_at)))


def set_active(engine: Engine, bundle_id: str) -> BundleRecord:
    """Make ``bundle_id`` the only active bundle, in one transaction."""
    with writer(engine).begin() as conn:
        # Lock every registry row so two concurrent promotions run one after the other.
        ids = set(conn.execute(sa.select(bundles.c.bundle_id).with_for_update()).scalars())
        if bundle_id not in ids:
            raise UnknownBundle(f"bundle {bundle_id} is not registered")
        conn.execute(
            sa.update(bundles)
            .where(bundles.c.active.is_(True), bundles.c.bundle_id != bundle_id)
            .values(active=False)
        )
        conn.execute(sa.update(bundles).where(bundles.c.bundle_id == bundle_id).values(active=True))
    return get_bundle(engine, bundle_id)
