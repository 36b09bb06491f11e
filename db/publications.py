"""Reports to publish and how publishing went: the scored images of a job, and the publications table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.models import Publication, utcnow
from db.tables import dialect_insert, images, job_images, predictions, uri_in
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.status import ImageStatus, PublishStatus

publications = Publication.__table__


@dataclass(frozen=True)
class ScoredImage:
    """A scored image of a job, with what its report says."""

    image_id: int
    uri: str
    bundle_id: str
    probability: float
    decision: bool
    threshold: float
    networks: dict[str, float | None]
    published: bool  # already published to the destination asked about


def scored_images(
    engine: Engine, job_id: int, destination: str, *, uris: Sequence[str] | None = None
) -> Iterator[ScoredImage]:
    """The job's scored images (those of ``uris`` only, when given), in registration order."""
    joined = (
        job_images.join(images, images.c.id == job_images.c.image_id)
        .join(predictions, predictions.c.id == job_images.c.prediction_id)
        .outerjoin(
            publications,
            sa.and_(
                publications.c.image_id == images.c.id,
                publications.c.bundle_id == predictions.c.bundle_id,
                publications.c.destination == destination,
            ),
        )
    )
    stmt = (
        sa.select(images.c.id, images.c.uri, predictions, publications.c.state.label("publish_state"))
        .select_from(joined)
        .where(job_images.c.job_id == job_id, job_images.c.state == ImageStatus.scored)
        .order_by(images.c.id)
    )
    if uris is not None:
        stmt = stmt.where(uri_in(engine.dialect.name, list(uris)))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    for row in rows:
        thresholds = row.thresholds or {}
        yield ScoredImage(
            image_id=row.id,
            uri=row.uri,
            bundle_id=row.bundle_id,
            probability=float(row.ensemble_score),
            decision=bool(row.ensemble_decision),
            threshold=float(thresholds.get(ENSEMBLE_KEY, 0.5)),
            networks={arch: getattr(row, f"{arch}_probability") for arch in ARCHITECTURES},
            published=row.publish_state == PublishStatus.published.value,
        )


def record_publications(engine: Engine, destination: str, outcomes: Sequence[dict[str, Any]]) -> None:
    """Upsert each ``{"image_id", "bundle_id", "state", "sop_uid", "reason"}`` for ``destination``."""
    if not outcomes:
        return
    insert = dialect_insert(engine.dialect.name)
    now = utcnow()
    rows = [
        {
            **o,
            "state": PublishStatus(o["state"]).value,
            "destination": destination,
            "attempts": 1,
            "updated_at": now,
        }
        for o in outcomes
    ]
    stmt = insert(publications).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["image_id", "bundle_id", "destination"],
        set_={
            "state": stmt.excluded.state,
            "sop_uid": stmt.excluded.sop_uid,
            "reason": stmt.excluded.reason,
            "attempts": publications.c.attempts + 1,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    with engine.begin() as conn:
        conn.execute(stmt)


def publication_counts(engine: Engine, job_id: int, destination: str) -> dict[str, int]:
    """How many of the job's images are in each publish state for ``destination``."""
    stmt = (
        sa.select(publications.c.state, sa.func.count())
        .select_from(publications.join(job_images, job_images.c.image_id == publications.c.image_id))
        .where(job_images.c.job_id == job_id, publications.c.destination == destination)
        .group_by(publications.c.state)
    )
    with engine.connect() as conn:
        return {state: count for state, count in conn.execute(stmt).all()}
