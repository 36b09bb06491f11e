"""Bulk, set-based writes: registering an archive's images and storing scored chunks.

Everything here is written for throughput and for redelivery: writing the same chunk twice leaves the same
rows, so a Celery task that runs again after a worker died can never duplicate a result.

Rows come from ``db.rows``. PostgreSQL sends them as typed arrays in one statement per registered batch
and one per scored chunk (``db.postgres``), each its own durable transaction. SQLite gets SQLAlchemy's
batched multi-row ``INSERT ... ON CONFLICT`` (the "insertmanyvalues" mode) here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db import postgres
from db.engine import writer
from db.models import utcnow
from db.rows import (
    HEATMAP_KEY,
    HEATMAP_UPDATES,
    LISTING_COLUMNS,
    MEMBER_KEY,
    MEMBER_UPDATES,
    PREDICTION_KEY,
    PREDICTION_UPDATES,
    RESULT_MEMBER_UPDATES,
    ImageRef,
    heatmap_row,
    member_row,
    prediction_shared,
    register_row,
    result_image_row,
    result_image_updates,
    result_member_row,
    score_row,
)
from db.tables import dialect_insert, heatmaps, images, job_images, predictions, scan_jobs, uri_batches
from deepcovid.chunking import batched
from deepcovid.defaults import IN_BATCH, REGISTER_BATCH
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus


def register_images(
    engine: Engine,
    job_id: int,
    bundle_id: str,
    refs: Iterable[ImageRef],
    *,
    rescore: bool = False,
    batch_size: int = REGISTER_BATCH,
) -> list[str]:
    """Make listed images members of a job and return the URIs that need scoring, in listing order.

    Every image gets fresh size/mtime/ETag. One the bundle has already scored joins the job as scored,
    with that prediction (marked reused when an earlier job made it), unless ``rescore``: then only this
    job's own predictions count, so resuming a rescoring job does not start over. The rest are queued.
    Other jobs' memberships are never touched.
    """
    to_enqueue: list[str] = []
    for batch in batched(refs, batch_size):
        # One row per URI: ON CONFLICT cannot touch the same row twice in one statement.
        rows = {ref.uri: register_row(ref) for ref in batch}
        now = utcnow()
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                registered = postgres.register_rows(
                    conn, list(rows.values()), job_id, bundle_id, now, rescore=rescore
                )
            else:
                registered = _register_rows(conn, rows, job_id, bundle_id, now, rescore=rescore)
            to_enqueue.extend(registered)
    return to_enqueue


def _register_rows(
    conn: Connection,
    rows: dict[str, dict[str, Any]],
    job_id: int,
    bundle_id: str,
    now: datetime,
    *,
    rescore: bool,
) -> list[str]:
    stamped = [{**row, "updated_at": now} for row in rows.values()]
    ids = dict(conn.execute(_register_statement(conn.dialect.name), stamped).all())
    # Index lookups, so the cost does not grow with the number of predictions stored.
    resolved = _resolved(conn, list(ids.values()), bundle_id, job_id if rescore else None)
    members = [member_row(job_id, ids[uri], resolved.get(ids[uri]), now) for uri in rows]
    conn.execute(_member_statement(conn.dialect.name), members)
    return [uri for uri in rows if ids[uri] not in resolved]


def _resolved(
    conn: Connection, image_ids: list[int], bundle_id: str, only_job: int | None
) -> dict[int, tuple[int, int | None]]:
    """image id -> (id, job) of the bundle's newest prediction for it (only ``only_job``'s when given)."""
    found: dict[int, tuple[int, int | None]] = {}
    for batch in batched(image_ids, IN_BATCH):
        stmt = (
            sa.select(predictions.c.image_id, predictions.c.id, predictions.c.job_id)
            .where(predictions.c.bundle_id == bundle_id, predictions.c.image_id.in_(batch))
            .order_by(predictions.c.id)
        )
        if only_job is not None:
            stmt = stmt.where(predictions.c.job_id == only_job)
        for image_id, prediction_id, made_by in conn.execute(stmt):
            found[image_id] = (prediction_id, made_by)
    return found


@cache
def _register_statement(dialect: str) -> Any:
    """Upsert listed images, refreshing what storage said about each; returns (uri, id)."""
    stmt = dialect_insert(dialect)(images)
    updated = {column: stmt.excluded[column] for column in LISTING_COLUMNS}
    return stmt.on_conflict_do_update(index_elements=[images.c.uri], set_=updated).returning(
        images.c.uri, images.c.id
    )


@cache
def _member_statement(dialect: str) -> Any:
    """Upsert memberships; listing an image again in the same job starts it afresh (or resolved)."""
    stmt = dialect_insert(dialect)(job_images)
    updated = {column: stmt.excluded[column] for column in MEMBER_UPDATES}
    return stmt.on_conflict_do_update(index_elements=list(MEMBER_KEY), set_=updated)


def image_ids(conn: Connection, uris: Sequence[str]) -> dict[str, int]:
    """uri -> image id for the registered ones."""
    found: dict[str, int] = {}
    for listed in uri_batches(conn.dialect.name, uris, IN_BATCH):
        found.update(
            {
                uri: image_id
                for uri, image_id in conn.execute(sa.select(images.c.uri, images.c.id).where(listed))
            }
        )
    return found


def record_attempts(engine: Engine, job_id: int, uris: Sequence[str]) -> dict[str, int]:
    """Count one more delivery of these images in this job; the worker fails an image that keeps killing
    workers."""
    counts: dict[str, int] = {}
    with writer(engine).begin() as conn:
        ids = image_ids(conn, uris)
        uri_of = {image_id: uri for uri, image_id in ids.items()}
        for batch in batched(uri_of, IN_BATCH):
            stmt = (
                sa.update(job_images)
                .where(job_images.c.job_id == job_id, job_images.c.image_id.in_(batch))
                .values(attempts=job_images.c.attempts + 1)
                .returning(job_images.c.image_id, job_images.c.attempts)
            )
            counts.update({uri_of[image_id]: count for image_id, count in conn.execute(stmt)})
    return counts


def write_results(
    engine: Engine,
    *,
    job_id: int,
    bundle_id: str,
    results: Sequence[ImageResult],
    worker_host: str | None,
    device: str | None,
) -> None:
    """Store one scored chunk in one transaction: images, predictions upserted on (image, bundle, job),
    heatmaps upserted on (image, bundle), and the images' states in the job.

    Idempotent: the same chunk written twice leaves the same rows. Unknown URIs are created and join the
    job. Only this job's memberships change, not those of images its closing cancelled, and only with
    the job's own bundle (another bundle's predictions are stored, and the job does not take them).
    """
    if not results:
        return
    now = utcnow()
    by_uri = {result.uri: result for result in results}
    if engine.dialect.name == "postgresql":
        # Sorted so two transactions writing overlapping chunks lock their image rows in the same order.
        by_uri = {uri: by_uri[uri] for uri in sorted(by_uri)}
    image_rows = [result_image_row(result) for result in by_uri.values()]
    member_rows = [result_member_row(result) for result in by_uri.values()]
    scores = {uri: score_row(result) for uri, result in by_uri.items() if result.scored}
    shared = prediction_shared(
        bundle_id=bundle_id, job_id=job_id, now=now, worker_host=worker_host, device=device
    )
    maps = {uri: heatmap_row(result) for uri, result in by_uri.items() if result.heatmap is not None}
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            postgres.write_chunk(conn, image_rows, member_rows, scores, shared)
            if maps:
                postgres.write_heatmaps(conn, maps, bundle_id, now)
            return
        stamped = [{**row, "updated_at": now} for row in image_rows]
        ids = dict(conn.execute(_result_images_statement(conn.dialect.name), stamped).all())
        prediction_ids: dict[int, int] = {}
        prediction_rows = [{"image_id": ids[uri], **shared, **row} for uri, row in scores.items()]
        if prediction_rows:
            prediction_ids = dict(
                conn.execute(_predictions_statement(conn.dialect.name), prediction_rows).all()
            )
        if maps:
            heatmap_rows = [
                {"image_id": ids[uri], "bundle_id": bundle_id, **row, "created_at": now}
                for uri, row in maps.items()
            ]
            conn.execute(_heatmaps_statement(conn.dialect.name), heatmap_rows)
        if not _job_uses(conn, job_id, bundle_id):
            return
        members = [
            {
                "job_id": job_id,
                "image_id": ids[uri],
                **row,
                "attempts": 0,
                "prediction_id": prediction_ids.get(ids[uri]),
                "reused": False,
                "updated_at": now,
            }
            for uri, row in zip(by_uri, member_rows, strict=True)
        ]
        conn.execute(_result_members_statement(conn.dialect.name), members)


def _job_uses(conn: Connection, job_id: int, bundle_id: str) -> bool:
    return (
        conn.execute(
            sa.select(sa.literal(True)).where(scan_jobs.c.id == job_id, scan_jobs.c.bundle_id == bundle_id)
        ).first()
        is not None
    )


@cache
def _result_images_statement(dialect: str) -> Any:
    stmt = dialect_insert(dialect)(images)
    return stmt.on_conflict_do_update(
        index_elements=[images.c.uri], set_=result_image_updates(stmt.excluded, images)
    ).returning(images.c.uri, images.c.id)


@cache
def _predictions_statement(dialect: str) -> Any:
    stmt = dialect_insert(dialect)(predictions)
    updated = {column: stmt.excluded[column] for column in PREDICTION_UPDATES}
    return stmt.on_conflict_do_update(index_elements=list(PREDICTION_KEY), set_=updated).returning(
        predictions.c.image_id, predictions.c.id
    )


@cache
def _heatmaps_statement(dialect: str) -> Any:
    stmt = dialect_insert(dialect)(heatmaps)
    updated = {column: stmt.excluded[column] for column in HEATMAP_UPDATES}
    return stmt.on_conflict_do_update(index_elements=list(HEATMAP_KEY), set_=updated)


@cache
def _result_members_statement(dialect: str) -> Any:
    stmt = dialect_insert(dialect)(job_images)
    updated = {column: stmt.excluded[column] for column in RESULT_MEMBER_UPDATES}
    return stmt.on_conflict_do_update(
        index_elements=list(MEMBER_KEY),
        set_=updated,
        where=job_images.c.state != ImageStatus.cancelled,
    )
