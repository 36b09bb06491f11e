"""The audit log: who viewed or decided what, and when. Objects are named by id, never by URI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.engine import writer
from db.models import AuditEntry, User, as_utc

audit_log = AuditEntry.__table__

# What the workbench records; the action names are stored verbatim.
ACTIONS = frozenset(
    {"sign_in", "sign_in_refused", "sign_out", "view_worklist", "view_image", "review", "adjudicate"}
)


def record(
    conn: Connection,
    user_id: int | None,
    action: str,
    object_type: str,
    object_id: int | None = None,
    detail: str | None = None,
) -> None:
    """Add one entry in the caller's transaction (a verdict and its entry commit together)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    conn.execute(
        audit_log.insert().values(
            user_id=user_id, action=action, object_type=object_type, object_id=object_id, detail=detail
        )
    )


def record_now(engine: Engine, *entry: Any) -> None:
    """``record`` (the same arguments after the connection) in a transaction of its own."""
    with writer(engine).begin() as conn:
        record(conn, *entry)


@dataclass(frozen=True)
class AuditLine:
    at: datetime
    user: str | None
    action: str
    object_type: str
    object_id: int | None
    detail: str | None


def recent(engine: Engine, *, object_type: str | None = None, object_id: int | None = None,
           limit: int = 100) -> list[AuditLine]:  # fmt: skip
    """The newest entries, for one object when given."""
    users = User.__table__
    stmt = (
        sa.select(audit_log, users.c.name)
        .select_from(audit_log.outerjoin(users, users.c.id == audit_log.c.user_id))
        .order_by(audit_log.c.id.desc())
        .limit(limit)
    )
    if object_type is not None:
        stmt = stmt.where(audit_log.c.object_type == object_type)
    if object_id is not None:
        stmt = stmt.where(audit_log.c.object_id == object_id)
    with engine.connect() as conn:
        return [
            AuditLine(as_utc(r.at), r.name, r.action, r.object_type, r.object_id, r.detail)
            for r in conn.execute(stmt)
        ]
