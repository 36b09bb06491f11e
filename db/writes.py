"""Bulk, set-based writes: registering an archive's images and storing scored chunks.

Everything here is written for throughput and for redelivery: writing the same chunk twice leaves the same
rows, so a Celery task that runs again after a worker died can never duplicate a result.

Rows come from ``db.rows``. PostgreSQL sends them as typed arrays in one statement per registered batch
and one per scored chunk (``db.postgres``), each its own durable transaction. SQLite gets SQLAlchemy's
batched multi-row ``INSERT ... ON CONFLICT`` (the "insertmanyvalues" mode) here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db import postgres
from db.engine import writer
from db.models import utcnow
from db.rows import (
    LISTING_COLUMNS,
    PREDICTION_KEY,
    PREDICTION_UPDATES,
    REQUEUE_COLUMNS,
    ImageRef,
    prediction_shared,
    register_row,
    register_shared,
    result_image_row,
    result_image_shared,
    result_image_updates,
    score_row,
)
from db.tables import dialect_insert, images, predictions, uri_batches
from deepcovid.chunking import batched
from deepcovid.defaults import IN_BATCH, REGISTER_BATCH
from deepcovid.results import ImageResult


def register_images(
    engine: Engine,
    job_id: int,
    bundle_id: str,
    refs: Iterable[ImageRef],
    *,
    rescore: bool = False,
    batch_size: int = REGISTER_BATCH,
) -> list[str]:
    """Attach listed images to a job and return the URIs that need scoring, in listing order.

    Every image gets ``last_job_id = job_id`` and fresh size/mtime/ETag. Images that already have a
    prediction from ``bundle_id`` keep their state and are not returned (unless ``rescore``); the rest
    go back to ``queued`` with their attempt count reset.
    """
    to_enqueue: list[str] = []
    for batch in batched(refs, batch_size):
        # One row per URI: ON CONFLICT cannot touch the same row twice in one statement.
        rows = {ref.uri: register_row(ref) for ref in batch}
        shared = register_shared(job_id, utcnow())
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                registered = postgres.register_rows(
                    conn, list(rows.values()), shared, bundle_id, rescore=rescore
                )
            else:
                registered = _register_rows(conn, rows, shared, bundle_id, rescore=rescore)
            to_enqueue.extend(registered)
    return to_enqueue


def _register_rows(
    conn: Connection,
    rows: dict[str, dict[str, Any]],
    shared: dict[str, Any],
    bundle_id: str,
    *,
    rescore: bool,
) -> list[str]:
    # Which of these already have this bundle's prediction: index lookups, so the cost does not grow with
    # the number of predictions stored (a correlated NOT EXISTS inside the upsert got hashed over all).
    scored = set() if rescore else _already_scored(conn, list(rows), bundle_id)
    requeued = [{**shared, **row} for uri, row in rows.items() if uri not in scored]
    kept = [{**shared, **row} for uri, row in rows.items() if uri in scored]
    if requeued:
        conn.execute(_register_statement(conn.dialect.name, requeue=True), requeued)
    if kept:
        conn.execute(_register_statement(conn.dialect.name, requeue=False), kept)
    return [row["uri"] for row in requeued]


def _already_scored(conn: Connection, uris: list[str], bundle_id: str) -> set[str]:
    found: set[str] = set()
    for listed in uri_batches(conn.dialect.name, uris, REGISTER_BATCH):
        stmt = (
            sa.select(images.c.uri)
            .select_from(images.join(predictions, predictions.c.image_id == images.c.id))
            .where(predictions.c.bundle_id == bundle_id, listed)
        )
        found.update(conn.execute(stmt).scalars())
    return found


@cache
def _register_statement(dialect: str, *, requeue: bool) -> Any:
    """Upsert listed images; ``requeue`` also puts existing ones back in the queue with no attempts."""
    stmt = dialect_insert(dialect)(images)
    refreshed = LISTING_COLUMNS + REQUEUE_COLUMNS if requeue else LISTING_COLUMNS
    updated = {column: stmt.excluded[column] for column in refreshed}
    return stmt.on_conflict_do_update(index_elements=[images.c.uri], set_=updated)


def record_attempts(engine: Engine, uris: Sequence[str]) -> dict[str, int]:
    """Count one more delivery of these images; the worker fails an image that keeps killing workers."""
    counts: dict[str, int] = {}
    with writer(engine).begin() as conn:
        for listed in uri_batches(conn.dialect.name, uris, IN_BATCH):
            stmt = (
                sa.update(images)
                .where(listed)
                .values(attempt_count=images.c.attempt_count + 1)
                .returning(images.c.uri, images.c.attempt_count)
            )
            counts.update({uri: count for uri, count in conn.execute(stmt)})
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
    """Store one scored chunk in one transaction: predictions upserted on (image, bundle), image states.

    Idempotent: the same chunk written twice leaves the same rows. Unknown URIs are created. An image
    that has since been attached to another job keeps that job's state (its prediction is still kept).
    """
    if not results:
        return
    now = utcnow()
    by_uri = {result.uri: result for result in results}
    if engine.dialect.name == "postgresql":
        # Sorted so two transactions writing overlapping chunks lock their image rows in the same order.
        by_uri = {uri: by_uri[uri] for uri in sorted(by_uri)}
    image_rows = [result_image_row(result) for result in by_uri.values()]
    scores = {uri: score_row(result) for uri, result in by_uri.items() if result.scored}
    image_shared = result_image_shared(job_id, now)
    shared = prediction_shared(
        bundle_id=bundle_id, job_id=job_id, now=now, worker_host=worker_host, device=device
    )
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            postgres.write_chunk(conn, image_rows, image_shared, scores, shared)
            return
        image_rows = [{**image_shared, **row} for row in image_rows]
        ids = dict(conn.execute(_result_images_statement(conn.dialect.name, job_id), image_rows).all())
        prediction_rows = [{"image_id": ids[uri], **shared, **row} for uri, row in scores.items()]
        if prediction_rows:
            conn.execute(_predictions_statement(conn.dialect.name), prediction_rows)


@lru_cache(maxsize=64)
def _result_images_statement(dialect: str, job_id: int) -> Any:
    stmt = dialect_insert(dialect)(images)
    job = sa.bindparam("p_job_id", value=job_id, type_=images.c.last_job_id.type)
    return stmt.on_conflict_do_update(
        index_elements=[images.c.uri], set_=result_image_updates(job, stmt.excluded, images)
    ).returning(images.c.uri, images.c.id)


@cache
def _predictions_statement(dialect: str) -> Any:
    stmt = dialect_insert(dialect)(predictions)
    updated = {column: stmt.excluded[column] for column in PREDICTION_UPDATES}
    return stmt.on_conflict_do_update(index_elements=list(PREDICTION_KEY), set_=updated)
