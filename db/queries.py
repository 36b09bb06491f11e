"""Read side of the results database: job progress, flagged images, streamed exports, per-image audit.

A job's images are those whose ``last_job_id`` is the job; their result is the prediction made by the
job's bundle. Exports stream rows with a server-side cursor so memory stays flat for millions of images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Literal, TextIO, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.models import as_utc, utcnow
from db.tables import images, predictions, scan_jobs, uri_batches
from deepcovid.defaults import IN_BATCH, RATE_WINDOW_S, STREAM_BATCH
from deepcovid.networks import ARCHITECTURES
from deepcovid.status import ImageStatus, JobStatus

R = TypeVar("R")

# Columns of iter_results rows and of exports, in order, and where each comes from.
_RESULT_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "uri": images.c.uri,
    "status": images.c.state,
    "reason": images.c.failure_reason,
    "detail": images.c.failure_detail,
    "ensemble_score": predictions.c.ensemble_score,
    "ensemble_decision": predictions.c.ensemble_decision,
    "disagreement": predictions.c.disagreement,
    **{
        f"{arch}_{kind}": predictions.c[f"{arch}_{kind}"]
        for arch in ARCHITECTURES
        for kind in ("probability", "decision")
    },
    "study_uid": images.c.study_uid,
    "series_uid": images.c.series_uid,
    "sop_uid": images.c.sop_uid,
    "view": images.c.view,
    "size": images.c.size,
    "attempts": images.c.attempt_count,
    "bundle_id": predictions.c.bundle_id,
    "scored_at": predictions.c.scored_at,
    "worker_host": predictions.c.worker_host,
    "device": predictions.c.device,
}
RESULT_FIELDS: tuple[str, ...] = tuple(_RESULT_COLUMNS)


class UnknownJob(LookupError):
    """No scan job has this id."""


class _StatusCount:
    """A JobProgress attribute: how many of the job's images are in one status."""

    def __init__(self, status: ImageStatus) -> None:
        self.status = status

    def __get__(self, progress: JobProgress | None, owner: type | None = None) -> Any:
        if progress is None:  # looked up on the class (documentation tools)
            return self
        return progress.counts.get(self.status.value, 0)


@dataclass
class JobProgress:
    """Where a scan job stands: counts by image state, failures by reason, flagged, speed and ETA."""

    job_id: int
    source: str
    bundle_id: str
    options: dict[str, Any]
    state: JobStatus
    created_at: datetime
    finished_at: datetime | None
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # every ImageStatus value, zeros included
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    rate_per_s: float = 0.0  # images finished per second over the last minute
    eta_s: float | None = None  # queued / rate; None while nothing has finished recently
    last_progress_at: datetime | None = None  # the newest change to one of its images, else its creation
    stalled: bool = False  # running, images queued, and no progress for longer than the stall window

    queued = _StatusCount(ImageStatus.queued)
    scored = _StatusCount(ImageStatus.scored)
    failed = _StatusCount(ImageStatus.failed)
    skipped = _StatusCount(ImageStatus.skipped)

    @property
    def done(self) -> int:
        return self.total - self.queued


@dataclass
class FlaggedImage:
    """An image the ensemble called COVID-positive, with what each network said."""

    uri: str
    ensemble_score: float | None
    probabilities: dict[str, float | None]
    disagreement: float | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    view: str | None


@dataclass
class PredictionRecord:
    """One bundle's verdict on an image and where it was produced."""

    bundle_id: str
    job_id: int | None
    scored_at: datetime | None
    worker_host: str | None
    device: str | None
    ensemble_score: float | None
    ensemble_decision: bool | None
    probabilities: dict[str, float | None]


@dataclass
class ImageAudit:
    """Everything recorded about one image: state, attempts, failure, and every bundle's prediction."""

    uri: str
    storage: str
    state: ImageStatus
    attempts: int
    failure_reason: str | None
    failure_detail: str | None
    last_job_id: int | None
    updated_at: datetime | None
    size: int | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    view: str | None
    predictions: list[PredictionRecord]


def job_progress(engine: Engine, job_id: int, *, stall_after: float | None = None) -> JobProgress:
    """Progress of one job; raises UnknownJob. ``stall_after`` (seconds) enables ``stalled``."""
    with engine.connect() as conn:
        job = conn.execute(sa.select(scan_jobs).where(scan_jobs.c.id == job_id)).one_or_none()
        if job is None:
            raise UnknownJob(f"no scan job {job_id}")
        return _progress(conn, job, stall_after)


def list_jobs(
    engine: Engine,
    limit: int | None = None,
    *,
    stall_after: float | None = None,
    running_only: bool = False,
) -> list[JobProgress]:
    """Every job's progress (or the running ones'), newest first."""
    with engine.connect() as conn:
        stmt = sa.select(scan_jobs).order_by(scan_jobs.c.id.desc())
        if running_only:
            stmt = stmt.where(scan_jobs.c.state == JobStatus.running)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [_progress(conn, job, stall_after) for job in conn.execute(stmt).all()]


def _progress(conn: Connection, job: sa.Row[Any], stall_after: float | None = None) -> JobProgress:
    progress = JobProgress(
        job_id=job.id,
        source=job.source,
        bundle_id=job.bundle_id,
        options=job.options or {},
        state=JobStatus(job.state),
        created_at=as_utc(job.created_at),
        finished_at=as_utc(job.finished_at),
    )
    of_job = images.c.last_job_id == job.id
    counts = {state.value: 0 for state in ImageStatus}
    for state, count in conn.execute(
        sa.select(images.c.state, sa.func.count()).where(of_job).group_by(images.c.state)
    ):
        counts[ImageStatus(state).value] = count
    progress.counts = counts
    progress.total = sum(counts.values())
    progress.failed_by_reason = {
        reason or "unknown": count
        for reason, count in conn.execute(
            sa.select(images.c.failure_reason, sa.func.count())
            .where(of_job, images.c.state == ImageStatus.failed)
            .group_by(images.c.failure_reason)
            .order_by(sa.func.count().desc())
        )
    }
    progress.flagged = conn.execute(
        sa.select(sa.func.count())
        .select_from(images.join(predictions, predictions.c.image_id == images.c.id))
        .where(
            of_job,
            images.c.state == ImageStatus.scored,
            predictions.c.bundle_id == job.bundle_id,
            predictions.c.ensemble_decision.is_(True),
        )
    ).scalar_one()

    now = utcnow()
    recent = conn.execute(
        sa.select(sa.func.count()).where(
            of_job,
            images.c.state.in_([ImageStatus.scored, ImageStatus.failed]),
            images.c.updated_at >= now - timedelta(seconds=RATE_WINDOW_S),
        )
    ).scalar_one()
    end = progress.finished_at or now
    window = min(RATE_WINDOW_S, max((end - progress.created_at).total_seconds(), 1.0))
    progress.rate_per_s = recent / window if progress.finished_at is None else 0.0
    if progress.queued and progress.rate_per_s > 0:
        progress.eta_s = progress.queued / progress.rate_per_s
    elif not progress.queued:
        progress.eta_s = 0.0
    newest = conn.execute(sa.select(sa.func.max(images.c.updated_at)).where(of_job)).scalar()
    progress.last_progress_at = max(progress.created_at, as_utc(newest) or progress.created_at)
    progress.stalled = (
        stall_after is not None
        and progress.state is JobStatus.running
        and progress.queued > 0
        and (now - progress.last_progress_at).total_seconds() > stall_after
    )
    return progress


def _job_bundle(conn: Connection, job_id: int) -> str:
    bundle_id = conn.execute(sa.select(scan_jobs.c.bundle_id).where(scan_jobs.c.id == job_id)).scalar()
    if bundle_id is None:
        raise UnknownJob(f"no scan job {job_id}")
    return bundle_id


def _probabilities(row: Any) -> dict[str, float | None]:
    return {arch: getattr(row, f"{arch}_probability") for arch in ARCHITECTURES}


def flagged_images(engine: Engine, job_id: int, limit: int | None = None) -> list[FlaggedImage]:
    """The job's images the ensemble flagged, highest ensemble score first."""
    with engine.connect() as conn:
        bundle_id = _job_bundle(conn, job_id)
        stmt = (
            sa.select(
                images.c.uri,
                images.c.study_uid,
                images.c.series_uid,
                images.c.sop_uid,
                images.c.view,
                predictions,
            )
            .select_from(images.join(predictions, predictions.c.image_id == images.c.id))
            .where(
                images.c.last_job_id == job_id,
                images.c.state == ImageStatus.scored,
                predictions.c.bundle_id == bundle_id,
                predictions.c.ensemble_decision.is_(True),
            )
            .order_by(predictions.c.ensemble_score.desc(), images.c.uri)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return [_record(FlaggedImage, row, probabilities=_probabilities(row)) for row in conn.execute(stmt)]


def iter_results(
    engine: Engine, job_id: int, flagged_only: bool = False, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """Every image of the job (scored, failed, queued, skipped) as a dict keyed by RESULT_FIELDS, in
    registration order; ``flagged_only``: the flagged images, highest ensemble score first.

    Streams: rows come from a server-side cursor ``batch_size`` at a time, so memory does not grow
    with the job. Keep the iterator short-lived: it holds a connection until exhausted or closed.
    """
    with engine.connect() as conn:
        bundle_id = _job_bundle(conn, job_id)
        joined = images.outerjoin(
            predictions,
            sa.and_(predictions.c.image_id == images.c.id, predictions.c.bundle_id == bundle_id),
        )
        stmt = (
            sa.select(*(column.label(name) for name, column in _RESULT_COLUMNS.items()))
            .select_from(joined)
            .where(images.c.last_job_id == job_id)
        )
        if flagged_only:  # the most suspicious first: the order a reviewer works in
            stmt = stmt.where(
                images.c.state == ImageStatus.scored, predictions.c.ensemble_decision.is_(True)
            ).order_by(predictions.c.ensemble_score.desc(), images.c.id)
        else:
            stmt = stmt.order_by(images.c.id)
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
        for row in result:
            out = dict(zip(RESULT_FIELDS, row, strict=True))
            out["status"] = out["status"].value
            if out["scored_at"] is not None:
                out["scored_at"] = as_utc(out["scored_at"])
            yield out


def export_results(
    engine: Engine,
    job_id: int,
    out: TextIO,
    fmt: Literal["csv", "jsonl"] = "csv",
    flagged_only: bool = False,
    *,
    limit: int | None = None,
    batch_size: int = STREAM_BATCH,
) -> int:
    """Write the job's results to ``out`` as CSV (with a header) or JSON lines; returns the row count.

    ``limit`` stops after that many rows (the CSV header is not a row).
    """
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"unknown export format {fmt!r}: use csv or jsonl")
    count = 0
    # Closed here, not when garbage-collected: a limit stops early, and the stream holds a connection.
    with closing(iter_results(engine, job_id, flagged_only=flagged_only, batch_size=batch_size)) as results:
        rows = islice(results, limit)
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(RESULT_FIELDS)
            for row in rows:
                writer.writerow([_csv_value(row[name]) for name in RESULT_FIELDS])
                count += 1
        else:
            for row in rows:
                out.write(json.dumps(row, default=_json_value, separators=(",", ":")))
                out.write("\n")
                count += 1
    return count


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot export {type(value).__name__}")


def chunk_state(engine: Engine, job_id: int, uris: Sequence[str]) -> dict[str, tuple[bool, int]]:
    """For each registered URI: (already finished in this job, attempt count so far)."""
    out: dict[str, tuple[bool, int]] = {}
    with engine.connect() as conn:
        for listed in uri_batches(conn.dialect.name, uris, IN_BATCH):
            rows = conn.execute(
                sa.select(images.c.uri, images.c.state, images.c.attempt_count, images.c.last_job_id).where(
                    listed
                )
            )
            for uri, state, attempts, last_job_id in rows:
                out[uri] = (state.finished and last_job_id == job_id, int(attempts or 0))
    return out


def image_audit(engine: Engine, uri: str) -> ImageAudit | None:
    """What the database knows about one image (None when it was never registered)."""
    with engine.connect() as conn:
        image = conn.execute(sa.select(images).where(images.c.uri == uri)).one_or_none()
        if image is None:
            return None
        records = [
            _record(PredictionRecord, row, scored_at=as_utc(row.scored_at), probabilities=_probabilities(row))
            for row in conn.execute(
                sa.select(predictions)
                .where(predictions.c.image_id == image.id)
                .order_by(predictions.c.scored_at.desc())
            )
        ]
    return _record(
        ImageAudit,
        image,
        attempts=image.attempt_count,
        updated_at=as_utc(image.updated_at),
        predictions=records,
    )


def _record(cls: type[R], row: sa.Row[Any], **computed: Any) -> R:
    """One of the dataclasses above from a row: fields named like the row's columns are copied from it,
    ``computed`` gives the others (and overrides, e.g. timestamps made timezone-aware)."""
    columns = row._mapping
    copied = {f.name: columns[f.name] for f in fields(cls) if f.name in columns and f.name not in computed}
    return cls(**copied, **computed)
