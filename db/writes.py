"""Bulk, set-based writes: registering an archive's images and storing scored chunks.

Everything here is written for throughput and for redelivery: writing the same chunk twice leaves the same
rows, so a Celery task that runs again after a worker died can never duplicate a result.

PostgreSQL gets hand-written statements over typed arrays (``unnest(%(uri)b::text[], ...)``, sent in
psycopg's binary format): one statement per registered batch and one per scored chunk, each its own durable
transaction. SQLite gets SQLAlchemy's batched multi-row ``INSERT ... ON CONFLICT``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from itertools import islice
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.engine import writer
from db.models import Image, Prediction, ScanJob, utcnow
from deepcovid.errors import REASONS
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus, JobStatus

# Rows per transaction when registering a listing: big enough for speed, small enough that SQLite's
# write lock is released often for the workers writing results meanwhile.
REGISTER_BATCH = 5000
# Rows per statement for UPDATE ... WHERE uri IN (...).
IN_BATCH = 1000

images = Image.__table__
predictions = Prediction.__table__
scan_jobs = ScanJob.__table__

T = TypeVar("T")


@dataclass(frozen=True)
class ImageRef:
    """One listed image: its URI and what storage said about it (used to notice changed files)."""

    uri: str
    storage: str | None = None  # "file" or "s3"; derived from the URI when left out
    size: int | None = None
    mtime: datetime | None = None
    etag: str | None = None


def storage_kind(uri: str) -> str:
    return "s3" if uri.startswith("s3://") else "file"


def create_job(engine: Engine, *, source: str, bundle_id: str, options: dict[str, Any] | None = None) -> int:
    """Start a scan job; its images are attached by register_images."""
    with writer(engine).begin() as conn:
        return conn.execute(
            sa.insert(scan_jobs)
            .values(
                source=source,
                bundle_id=bundle_id,
                options=options or {},
                state=JobStatus.running,
                created_at=utcnow(),
            )
            .returning(scan_jobs.c.id)
        ).scalar_one()


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
    for batch in _batched(refs, batch_size):
        with writer(engine).begin() as conn:
            to_enqueue.extend(_register_batch(conn, job_id, bundle_id, batch, rescore=rescore))
    return to_enqueue


def _register_batch(
    conn: Connection, job_id: int, bundle_id: str, refs: Sequence[ImageRef], *, rescore: bool
) -> list[str]:
    if conn.dialect.name == "postgresql":
        return _register_batch_pg(conn, job_id, bundle_id, refs, rescore=rescore)
    now = utcnow()
    rows: dict[str, dict[str, Any]] = {}
    for ref in refs:  # one row per URI: ON CONFLICT cannot touch the same row twice in one statement
        rows[ref.uri] = {
            "uri": ref.uri,
            "storage": ref.storage or storage_kind(ref.uri),
            "size": ref.size,
            "mtime": ref.mtime,
            "etag": ref.etag,
            "state": ImageStatus.queued,
            "attempt_count": 0,
            "last_job_id": job_id,
            "updated_at": now,
        }
    # Which of these already have this bundle's prediction: index lookups, so the cost does not grow with
    # the number of predictions stored (a correlated NOT EXISTS inside the upsert got hashed over all).
    scored = set() if rescore else _already_scored(conn, list(rows), bundle_id)
    requeued = [row for uri, row in rows.items() if uri not in scored]
    kept = [row for uri, row in rows.items() if uri in scored]
    if requeued:
        _execute_rows(conn, _register_statement(conn.dialect.name, requeue=True), requeued)
    if kept:
        _execute_rows(conn, _register_statement(conn.dialect.name, requeue=False), kept)
    return [row["uri"] for row in requeued]


def _already_scored(conn: Connection, uris: list[str], bundle_id: str) -> set[str]:
    found: set[str] = set()
    for batch in _batched(uris, REGISTER_BATCH):
        stmt = (
            sa.select(images.c.uri)
            .select_from(images.join(predictions, predictions.c.image_id == images.c.id))
            .where(predictions.c.bundle_id == bundle_id, _uri_in(conn, batch))
        )
        found.update(conn.execute(stmt).scalars())
    return found


def _uri_in(conn: Connection, uris: list[str]) -> sa.ColumnElement[bool]:
    """``images.uri IN (...)``; on PostgreSQL one array parameter (``= ANY``) rather than thousands."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        return images.c.uri == sa.any_(sa.bindparam("uris", value=uris, type_=ARRAY(sa.Text)))
    return images.c.uri.in_(uris)


_REGISTER_COLUMNS = (
    "uri",
    "storage",
    "size",
    "mtime",
    "etag",
    "state",
    "attempt_count",
    "last_job_id",
    "updated_at",
)


@cache
def _register_statement(dialect: str, *, requeue: bool) -> Any:
    """Upsert listed images; ``requeue`` also puts existing ones back in the queue with no attempts."""
    stmt = _insert_rows_statement(dialect, images, _REGISTER_COLUMNS)
    excluded = stmt.excluded
    updated: dict[str, Any] = {
        "storage": excluded.storage,
        "size": excluded.size,
        "mtime": excluded.mtime,
        "etag": excluded.etag,
        "last_job_id": excluded.last_job_id,
    }
    if requeue:
        updated |= {
            "state": excluded.state,
            "attempt_count": excluded.attempt_count,
            "failure_reason": None,
            "failure_detail": None,
            "updated_at": excluded.updated_at,
        }
    return stmt.on_conflict_do_update(index_elements=[images.c.uri], set_=updated)


def record_attempts(engine: Engine, uris: Sequence[str]) -> dict[str, int]:
    """Count one more delivery of these images; the worker fails an image that keeps killing workers."""
    counts: dict[str, int] = {}
    with writer(engine).begin() as conn:
        for batch in _batched(dict.fromkeys(uris), IN_BATCH):
            stmt = (
                sa.update(images)
                .where(_uri_in(conn, batch))
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
        _write_results_pg(engine, job_id, bundle_id, by_uri, worker_host, device, now)
        return
    image_rows = [_image_row(result, job_id, now) for result in by_uri.values()]
    with writer(engine).begin() as conn:
        dialect = conn.dialect.name
        found = _execute_rows(conn, _result_images_statement(dialect, job_id), image_rows)
        ids = dict(found.all())
        prediction_rows = [
            _prediction_row(result, ids[result.uri], job_id, bundle_id, worker_host, device, now)
            for result in by_uri.values()
            if result.status == "scored"
        ]
        if prediction_rows:
            _execute_rows(conn, _predictions_statement(dialect), prediction_rows)


_RESULT_IMAGE_COLUMNS = (
    "uri",
    "storage",
    "size",
    "state",
    "failure_reason",
    "failure_detail",
    "attempt_count",
    "last_job_id",
    "updated_at",
    "study_uid",
    "series_uid",
    "sop_uid",
    "view",
)
_PREDICTION_COLUMNS = (
    "image_id",
    "bundle_id",
    "job_id",
    *(f"{arch}_{kind}" for arch in ARCHITECTURES for kind in ("probability", "decision")),
    "ensemble_score",
    "ensemble_decision",
    "disagreement",
    "thresholds",
    "scored_at",
    "worker_host",
    "device",
)


@lru_cache(maxsize=64)
def _result_images_statement(dialect: str, job_id: int) -> Any:
    stmt = _insert_rows_statement(dialect, images, _RESULT_IMAGE_COLUMNS)
    excluded = stmt.excluded
    ours = sa.or_(
        images.c.last_job_id.is_(None),
        images.c.last_job_id == sa.bindparam("p_job_id", value=job_id, type_=images.c.last_job_id.type),
    )

    def if_ours(column: str) -> sa.Case[Any]:
        return sa.case((ours, excluded[column]), else_=images.c[column])

    def known(column: str) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(excluded[column], images.c[column])

    return stmt.on_conflict_do_update(
        index_elements=[images.c.uri],
        set_={
            "state": if_ours("state"),
            "failure_reason": if_ours("failure_reason"),
            "failure_detail": if_ours("failure_detail"),
            "updated_at": if_ours("updated_at"),
            **{column: known(column) for column in ("size", "study_uid", "series_uid", "sop_uid", "view")},
        },
    ).returning(images.c.uri, images.c.id)


@cache
def _predictions_statement(dialect: str) -> Any:
    stmt = _insert_rows_statement(dialect, predictions, _PREDICTION_COLUMNS)
    updated = {
        name: stmt.excluded[name] for name in _PREDICTION_COLUMNS if name not in ("image_id", "bundle_id")
    }
    return stmt.on_conflict_do_update(
        index_elements=[predictions.c.image_id, predictions.c.bundle_id], set_=updated
    )


def _image_row(result: ImageResult, job_id: int, now: datetime) -> dict[str, Any]:
    scored = result.status == "scored"
    row: dict[str, Any] = {
        "uri": result.uri,
        "storage": storage_kind(result.uri),
        "size": result.size,
        "state": ImageStatus.scored if scored else ImageStatus.failed,
        "failure_reason": None if scored else (result.reason or "internal_error"),
        "failure_detail": None if scored else (result.detail or None),
        "attempt_count": 0,
        "last_job_id": job_id,
        "updated_at": now,
    }
    row.update(dicom_fields(result.info))
    return row


# Where decoders may put the DICOM identifiers we keep (never patient identity).
_DICOM_KEYS: dict[str, tuple[str, ...]] = {
    "study_uid": ("study_uid", "study_instance_uid", "StudyInstanceUID"),
    "series_uid": ("series_uid", "series_instance_uid", "SeriesInstanceUID"),
    "sop_uid": ("sop_uid", "sop_instance_uid", "SOPInstanceUID"),
    "view": ("view", "view_position", "ViewPosition"),
}
_ANY_DICOM_KEY = frozenset(key for keys in _DICOM_KEYS.values() for key in keys)
_DICOM_LENGTHS = {"study_uid": 64, "series_uid": 64, "sop_uid": 64, "view": 16}


def dicom_fields(info: dict[str, Any] | None) -> dict[str, str | None]:
    """Study/series/SOP instance UIDs and view position from a result's decoder info, when present."""
    info = info or {}
    sources = [info]
    if isinstance(info.get("dicom"), dict):
        sources.insert(0, info["dicom"])
    elif not _ANY_DICOM_KEY.intersection(info):
        return dict.fromkeys(_DICOM_KEYS)
    out: dict[str, str | None] = {}
    for column, keys in _DICOM_KEYS.items():
        value = next((src[k] for src in sources for k in keys if src.get(k)), None)
        out[column] = str(value)[: _DICOM_LENGTHS[column]] if value is not None else None
    return out


def _prediction_row(
    result: ImageResult,
    image_id: int,
    job_id: int,
    bundle_id: str,
    worker_host: str | None,
    device: str | None,
    now: datetime,
) -> dict[str, Any]:
    row: dict[str, Any] = {"image_id": image_id, "bundle_id": bundle_id, "job_id": job_id}
    for arch in ARCHITECTURES:
        row[f"{arch}_probability"] = _float(result.probabilities.get(arch))
        decision = result.decisions.get(arch)
        row[f"{arch}_decision"] = None if decision is None else bool(decision)
    row["ensemble_score"] = _float(result.ensemble_score)
    row["ensemble_decision"] = None if result.ensemble_decision is None else bool(result.ensemble_decision)
    row["disagreement"] = _float(result.disagreement)
    row["thresholds"] = {str(k): float(v) for k, v in (result.thresholds or {}).items()}
    row["scored_at"] = now
    row["worker_host"] = worker_host
    row["device"] = device
    return row


def _float(value: Any) -> float | None:
    """numpy scalars to plain floats (drivers do not adapt them); NaN stored as NULL."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: set-based statements over typed arrays
#
# Each column travels as one array parameter in binary format (``%(name)b``: psycopg packs a binary array
# several times faster than it quotes a text one), which the server unpacks with ``unnest`` far more cheaply
# than parsing JSON rows. Every call is a single statement in its own transaction (commit durable:
# synchronous_commit is left as the server says). Statements go straight to psycopg so SQLAlchemy does not
# walk the arrays element by element.

_PG_REGISTER_SQL = """
WITH src AS MATERIALIZED (
    SELECT s.uri, s.storage, s.size, s.mtime, s.etag, s.ord, {scored} AS scored
    FROM unnest(%(uri)b::text[], %(storage)b::text[], %(size)b::int8[], %(mtime)b::timestamptz[],
                %(etag)b::text[]) WITH ORDINALITY AS s(uri, storage, size, mtime, etag, ord)
),
upserted AS (
    INSERT INTO images AS i (uri, storage, size, mtime, etag, state, attempt_count, last_job_id, updated_at)
    SELECT uri, storage, size, mtime, etag, CASE WHEN scored THEN 'scored' ELSE 'queued' END, 0,
           %(job_id)s, %(now)s
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        storage = excluded.storage, size = excluded.size, mtime = excluded.mtime, etag = excluded.etag,
        last_job_id = excluded.last_job_id,
        -- excluded.state says whether the image needs scoring ('queued') or keeps its state ('scored')
        state = CASE WHEN excluded.state = 'queued' THEN 'queued' ELSE i.state END,
        attempt_count = CASE WHEN excluded.state = 'queued' THEN 0 ELSE i.attempt_count END,
        failure_reason = CASE WHEN excluded.state = 'queued' THEN NULL ELSE i.failure_reason END,
        failure_detail = CASE WHEN excluded.state = 'queued' THEN NULL ELSE i.failure_detail END,
        updated_at = CASE WHEN excluded.state = 'queued' THEN excluded.updated_at ELSE i.updated_at END
)
SELECT ord FROM src WHERE scored
"""
# A scalar subquery (at most one row: uri and (image, bundle) are unique) runs per listed row as two index
# probes; the planner may turn an EXISTS into a hashed subplan reading every prediction of the bundle.
_PG_SCORED = (
    "coalesce((SELECT true FROM images e JOIN predictions p ON p.image_id = e.id "
    "WHERE e.uri = s.uri AND p.bundle_id = %(bundle_id)s), false)"
)


def _register_batch_pg(
    conn: Connection, job_id: int, bundle_id: str, refs: Sequence[ImageRef], *, rescore: bool
) -> list[str]:
    rows = {ref.uri: ref for ref in refs}  # one row per URI: ON CONFLICT cannot touch a row twice
    listed = list(rows.values())
    sql = _PG_REGISTER_SQL.format(scored="false" if rescore else _PG_SCORED)
    params = {
        "uri": [ref.uri for ref in listed],
        "storage": [ref.storage or storage_kind(ref.uri) for ref in listed],
        "size": [ref.size for ref in listed],
        "mtime": [ref.mtime for ref in listed],
        "etag": [ref.etag for ref in listed],
        "job_id": job_id,
        "bundle_id": bundle_id,
        "now": utcnow(),
    }
    # Never a prepared statement: PostgreSQL could settle on a generic plan made while predictions was
    # empty, and a re-listed archive then registered at 69 rows/s (each probe a scan of all predictions).
    driver = conn.connection.driver_connection
    assert driver is not None
    scored = {ordinal for (ordinal,) in driver.execute(sql, params, prepare=False)}
    return [ref.uri for ordinal, ref in enumerate(listed, 1) if ordinal not in scored]


# Per-row prediction values; the rest (image id, bundle, job, time, host, device) are one per chunk.
_PG_PREDICTION_VALUES = tuple(
    name
    for name in _PREDICTION_COLUMNS
    if name not in ("image_id", "bundle_id", "job_id", "scored_at", "worker_host", "device")
)
_PG_ARRAY_TYPES = {"thresholds": "json"} | {
    name: "bool" if name.endswith("_decision") else "float8"
    for name in _PG_PREDICTION_VALUES
    if name != "thresholds"
}
_PG_IMAGE_VALUES = {
    "uri": "text",
    "size": "int8",
    "state": "text",
    "failure_reason": "text",
    "failure_detail": "text",
    "study_uid": "text",
    "series_uid": "text",
    "sop_uid": "text",
    "view": "text",
    "scored": "bool",
}
_PG_SOURCE_COLUMNS = {**_PG_IMAGE_VALUES, **_PG_ARRAY_TYPES}


def _pg_write_results_sql() -> str:
    """One statement: upsert the chunk's images (an unknown URI is created), then upsert its predictions.

    An image listed again by another job since this chunk was sent keeps that job's state; only its
    metadata is filled in. The upsert's arbiter index makes every image an index lookup whatever the
    planner's statistics say (an UPDATE ... FROM join can turn into a scan of the whole table).
    """
    names = list(_PG_SOURCE_COLUMNS)
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in _PG_SOURCE_COLUMNS.items())
    ours = "(i.last_job_id IS NULL OR i.last_job_id = %(job_id)s)"

    def assignments(new: str) -> str:  # the SET list, taking the chunk's values from ``new``
        kept = [
            f"{column} = CASE WHEN {ours} THEN {new}.{column} ELSE i.{column} END"
            for column in ("state", "failure_reason", "failure_detail")
        ]
        kept.append(f"updated_at = CASE WHEN {ours} THEN %(now)s ELSE i.updated_at END")
        known = [
            f"{column} = coalesce({new}.{column}, i.{column})"
            for column in ("size", "study_uid", "series_uid", "sop_uid", "view")
        ]
        return ",\n        ".join(kept + known)

    prediction_columns = ", ".join(_PG_PREDICTION_VALUES)
    prediction_updates = ", ".join(
        f"{column} = excluded.{column}"
        for column in ("job_id", *_PG_PREDICTION_VALUES, "scored_at", "worker_host", "device")
    )
    return f"""
WITH src AS MATERIALIZED (
    SELECT * FROM unnest({arrays}) AS s({", ".join(names)})
),
images_written AS (
    INSERT INTO images AS i (uri, storage, size, state, failure_reason, failure_detail, attempt_count,
                             last_job_id, updated_at, study_uid, series_uid, sop_uid, view)
    SELECT uri, CASE WHEN starts_with(uri, 's3://') THEN 's3' ELSE 'file' END, size, state, failure_reason,
           failure_detail, 0, %(job_id)s, %(now)s, study_uid, series_uid, sop_uid, view
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        {assignments("excluded")}
    RETURNING i.id, i.uri
)
INSERT INTO predictions AS p (image_id, bundle_id, job_id, {prediction_columns},
                              scored_at, worker_host, device)
SELECT ids.id, %(bundle_id)s, %(job_id)s, {", ".join(f"src.{c}" for c in _PG_PREDICTION_VALUES)},
       %(now)s, %(worker_host)s, %(device)s
FROM images_written AS ids
JOIN src ON src.uri = ids.uri
WHERE src.scored
ON CONFLICT (image_id, bundle_id) DO UPDATE SET {prediction_updates}
"""


_PG_WRITE_RESULTS_SQL = _pg_write_results_sql()


def _write_results_pg(
    engine: Engine,
    job_id: int,
    bundle_id: str,
    by_uri: dict[str, ImageResult],
    worker_host: str | None,
    device: str | None,
    now: datetime,
) -> None:
    # Sorted so two transactions writing overlapping chunks lock their image rows in the same order.
    chunk = [by_uri[uri] for uri in sorted(by_uri)]
    scored = [result.status == "scored" for result in chunk]
    dicom = [dicom_fields(result.info) for result in chunk]
    columns: dict[str, list[Any]] = {
        "uri": [result.uri for result in chunk],
        "size": [result.size for result in chunk],
        "state": [ImageStatus.scored.value if ok else ImageStatus.failed.value for ok in scored],
        "failure_reason": [
            None if result.status == "scored" else (result.reason or "internal_error") for result in chunk
        ],
        "failure_detail": [
            None if result.status == "scored" else (result.detail or None) for result in chunk
        ],
        **{column: [fields[column] for fields in dicom] for column in _DICOM_KEYS},
        "scored": scored,
        "ensemble_score": _floats(result.ensemble_score for result in chunk),
        "ensemble_decision": _bools(result.ensemble_decision for result in chunk),
        "disagreement": _floats(result.disagreement for result in chunk),
        "thresholds": _thresholds_json(result.thresholds for result in chunk),
    }
    for arch in ARCHITECTURES:
        columns[f"{arch}_probability"] = _floats((r.probabilities or {}).get(arch) for r in chunk)
        columns[f"{arch}_decision"] = _bools((r.decisions or {}).get(arch) for r in chunk)
    params: dict[str, Any] = {
        **columns,
        "job_id": job_id,
        "bundle_id": bundle_id,
        "now": now,
        "worker_host": worker_host,
        "device": device,
    }
    with writer(engine).begin() as conn:
        conn.exec_driver_sql(_PG_WRITE_RESULTS_SQL, params)


def _floats(values: Iterable[Any]) -> list[float | None]:
    """Plain floats (numpy scalars converted), NaN as None: _float for a whole column."""
    out: list[float | None] = []
    for value in values:
        if value is not None:
            value = float(value)
            if value != value:  # NaN
                value = None
        out.append(value)
    return out


def _bools(values: Iterable[Any]) -> list[bool | None]:
    return [None if value is None else bool(value) for value in values]


def _thresholds_json(values: Iterable[dict[str, float] | None]) -> list[str]:
    """Each result's thresholds as JSON text; a chunk's results nearly always share one dict."""
    cache: dict[tuple[tuple[str, float], ...], str] = {}
    out: list[str] = []
    for thresholds in values:
        key = tuple((str(k), float(v)) for k, v in (thresholds or {}).items())
        text = cache.get(key)
        if text is None:
            text = cache[key] = json.dumps(dict(key))
        out.append(text)
    return out


def finish_job_if_done(engine: Engine, job_id: int) -> bool:
    """Mark a running job finished once none of its images is queued; True when the job is finished."""
    with writer(engine).begin() as conn:
        conn.execute(
            sa.update(scan_jobs)
            .where(
                scan_jobs.c.id == job_id,
                scan_jobs.c.state == JobStatus.running,
                ~sa.exists().where(images.c.last_job_id == job_id, images.c.state == ImageStatus.queued),
            )
            .values(state=JobStatus.finished, finished_at=utcnow())
        )
        state = conn.execute(
            sa.select(scan_jobs.c.state).where(scan_jobs.c.id == job_id)
        ).scalar_one_or_none()
    return state == JobStatus.finished


def requeue_failed(engine: Engine, job_id: int, reason: str | None = None) -> list[str]:
    """Put a job's failed images (optionally only those failed for ``reason``) back in the queue."""
    with writer(engine).begin() as conn:
        stmt = (
            sa.update(images)
            .where(images.c.last_job_id == job_id, images.c.state == ImageStatus.failed)
            .values(
                state=ImageStatus.queued,
                attempt_count=0,
                failure_reason=None,
                failure_detail=None,
                updated_at=utcnow(),
            )
            .returning(images.c.id, images.c.uri)
        )
        if reason is not None:
            stmt = stmt.where(images.c.failure_reason == reason)
        rows = sorted(conn.execute(stmt).all())
        if rows:
            conn.execute(
                sa.update(scan_jobs)
                .where(scan_jobs.c.id == job_id)
                .values(state=JobStatus.running, finished_at=None)
            )
    return [uri for _id, uri in rows]


def mark_failed(engine: Engine, job_id: int, uris: Sequence[str], reason: str, detail: str = "") -> list[str]:
    """Fail a job's still-queued images (e.g. ``crashed_worker``); returns the URIs it changed."""
    if reason not in REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    changed: list[str] = []
    with writer(engine).begin() as conn:
        for batch in _batched(dict.fromkeys(uris), IN_BATCH):
            stmt = (
                sa.update(images)
                .where(
                    _uri_in(conn, batch),
                    images.c.state == ImageStatus.queued,
                    sa.or_(images.c.last_job_id.is_(None), images.c.last_job_id == job_id),
                )
                .values(
                    state=ImageStatus.failed,
                    failure_reason=reason,
                    failure_detail=detail or REASONS[reason],
                    updated_at=utcnow(),
                )
                .returning(images.c.uri)
            )
            changed.extend(conn.execute(stmt).scalars())
    return changed


def cancel_job(engine: Engine, job_id: int) -> int:
    """Stop a job: its still-queued images become ``skipped``; returns how many were skipped."""
    with writer(engine).begin() as conn:
        skipped = conn.execute(
            sa.update(images)
            .where(images.c.last_job_id == job_id, images.c.state == ImageStatus.queued)
            .values(state=ImageStatus.skipped, updated_at=utcnow())
        ).rowcount
        conn.execute(
            sa.update(scan_jobs)
            .where(scan_jobs.c.id == job_id, scan_jobs.c.state == JobStatus.running)
            .values(state=JobStatus.cancelled, finished_at=utcnow())
        )
    return skipped


def _insert_rows_statement(dialect: str, table: sa.Table, columns: tuple[str, ...]) -> Any:
    """An INSERT of many rows that takes ON CONFLICT (SQLite: SQLAlchemy batches the rows into multi-row
    VALUES with "insertmanyvalues"); run it with _execute_rows. ``columns`` documents what rows carry."""
    return dialect_insert(dialect)(table)


def dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert`` construct, the one that offers ``on_conflict_do_update``."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upserts are written for SQLite and PostgreSQL, not {dialect}")
    return insert


def _execute_rows(conn: Connection, stmt: Any, rows: list[dict[str, Any]]) -> sa.CursorResult[Any]:
    """Run a statement from _insert_rows_statement over ``rows`` (values shared by all rows are bound
    in the statement: as per-row parameters they would stop SQLAlchemy batching rows on SQLite)."""
    return conn.execute(stmt, rows)


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
