"""Reviewers' verdicts: one per reviewer and image (a later one replaces it), the image's review state
kept beside them, and an admin's adjudication as the final word on a disputed image."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.engine import writer
from db.models import ImageReview, Review, User, as_utc, utcnow
from db.tables import dialect_insert
from deepcovid.status import ReviewState, Verdict
from review import audit
from review.accounts import Account

reviews = Review.__table__
image_reviews = ImageReview.__table__
NOTE_LIMIT = 2000


class NotAllowed(PermissionError):
    """The account may not do this (adjudication is for admins)."""


@dataclass(frozen=True)
class ReviewRecord:
    reviewer: str
    verdict: Verdict
    note: str | None
    adjudication: bool
    bundle_id: str
    created_at: datetime | None


def consensus(verdicts: list[Verdict], adjudicated: Verdict | None) -> tuple[ReviewState, Verdict | None]:
    """An adjudication decides; else agreeing verdicts are the consensus and disagreeing ones a dispute."""
    if adjudicated is not None:
        return ReviewState.reviewed, adjudicated
    if not verdicts:
        return ReviewState.unreviewed, None
    if len(set(verdicts)) == 1:
        return ReviewState.reviewed, verdicts[0]
    return ReviewState.disputed, None


def record_verdict(
    engine: Engine,
    account: Account,
    image_id: int,
    bundle_id: str,
    verdict: Verdict,
    note: str | None = None,
    *,
    adjudicate: bool = False,
) -> tuple[ReviewState, Verdict | None]:
    """Store ``account``'s verdict (replacing their earlier one), update the image's state, audit it."""
    if adjudicate and not account.is_admin:
        raise NotAllowed("only an admin adjudicates")
    note = (note or "").strip()[:NOTE_LIMIT] or None
    with writer(engine).begin() as conn:
        key = (
            (reviews.c.image_id == image_id)
            & (reviews.c.reviewer_id == account.id)
            & (reviews.c.adjudication == adjudicate)
        )
        conn.execute(reviews.delete().where(key))
        conn.execute(
            reviews.insert().values(
                image_id=image_id,
                bundle_id=bundle_id,
                reviewer_id=account.id,
                verdict=verdict,
                note=note,
                adjudication=adjudicate,
            )
        )
        state = _refresh_state(conn, image_id)
        action = "adjudicate" if adjudicate else "review"
        audit.record(conn, account.id, action, "image", image_id, f"{verdict.value} bundle={bundle_id}")
    return state


def _refresh_state(conn: Connection, image_id: int) -> tuple[ReviewState, Verdict | None]:
    rows = conn.execute(
        sa.select(reviews.c.verdict, reviews.c.adjudication)
        .where(reviews.c.image_id == image_id)
        .order_by(reviews.c.id)
    ).all()
    verdicts = [Verdict(r.verdict) for r in rows if not r.adjudication]
    adjudicated = [Verdict(r.verdict) for r in rows if r.adjudication]
    state, agreed = consensus(verdicts, adjudicated[-1] if adjudicated else None)
    values = {"state": state, "consensus": agreed, "reviews": len(rows), "updated_at": utcnow()}
    insert = dialect_insert(conn.dialect.name)(image_reviews).values(image_id=image_id, **values)
    conn.execute(insert.on_conflict_do_update(index_elements=["image_id"], set_=values))
    return state, agreed


def reviews_of(engine: Engine, image_id: int) -> list[ReviewRecord]:
    users = User.__table__
    stmt = (
        sa.select(reviews, users.c.name)
        .select_from(reviews.join(users, users.c.id == reviews.c.reviewer_id))
        .where(reviews.c.image_id == image_id)
        .order_by(reviews.c.adjudication, reviews.c.created_at, reviews.c.id)
    )
    with engine.connect() as conn:
        return [
            ReviewRecord(
                r.name, Verdict(r.verdict), r.note, bool(r.adjudication), r.bundle_id, as_utc(r.created_at)
            )  # fmt: skip
            for r in conn.execute(stmt)
        ]


def review_state(engine: Engine, image_id: int) -> tuple[ReviewState, Verdict | None]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(image_reviews.c.state, image_reviews.c.consensus).where(
                image_reviews.c.image_id == image_id
            )
        ).first()
    if row is None:
        return ReviewState.unreviewed, None
    return ReviewState(row.state), Verdict(row.consensus) if row.consensus else None
