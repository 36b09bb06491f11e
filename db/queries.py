"""Read side of the results database: job progress, flagged images, streamed exports, per-image audit.

A job's images are its members (``job_images``), each with the state it reached in that job and the
prediction it resolved to, so a job reads the same forever, whatever later jobs do. Exports stream rows
with a server-side cursor so memory stays flat for millions of images.
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

from db.jobs import runner_gone
from db.models import as_utc, utcnow
from db.tables import heatmaps, images, job_images, predictions, scan_jobs, uri_batches
from deepcovid.defaults import IN_BATCH, RATE_WINDOW_S, STREAM_BATCH
from deepcovid.networks import ARCHITECTURES
from deepcovid.status import ImageStatus, JobStatus

R = TypeVar("R")

# Columns of iter_results rows and of exports, in order, and where each comes from.
_RESULT_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "uri": images.c.uri,
    "status": job_images.c.state,
    "reason": job_images.c.failure_reason,
    "detail": job_images.c.failure_detail,
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
    "attempts": job_images.c.attempts,
    "reused": job_images.c.reused,
    "bundle_id": predictions.c.bundle_id,
    "scored_at": predictions.c.scored_at,
    "worker_host": predictions.c.worker_host,
    "device": predictions.c.device,
    # The Grad-CAM artifact's opaque key in the artifact store (DEEPCOVID_ARTIFACTS), or why there is none.
    "heatmap": heatmaps.c.key,
    "heatmap_error": heatmaps.c.error,
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
    """Where a scan job stands: counts by image state, failures by reason, flagged, speed and ETA.

    ``state`` is what is true now: a running job whose ``screen`` process is gone reads ``interrupted``.
    Only a running job has a rate and an ETA.
    """

    job_id: int
    source: str
    bundle_id: str
    options: dict[str, Any]
    state: JobStatus
    created_at: datetime
    finished_at: datetime | None
    detail: str | None = None  # why it failed or was interrupted
    runner: str | None = None
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # every ImageStatus value, zeros included
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    reused: int = 0  # scored by an earlier job with the same bundle
    rate_per_s: float | None = None  # images finished per second over the last minute, while running
    eta_s: float | None = None  # queued / rate; None unless running with recent progress
    last_progress_at: datetime | None = None  # the newest change to one of its images, else its creation
    stalled: bool = False  # running, images queued, and no progress for longer than the stall window

    queued = _StatusCount(ImageStatus.queued)
    scored = _StatusCount(ImageStatus.scored)
    failed = _StatusCount(ImageStatus.failed)
    cancelled = _StatusCount(ImageStatus.cancelled)

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
    """Everything recorded about one image: the file, each job's record of it, every prediction."""

    uri: str
    storage: str
    updated_at: datetime | None
    size: int | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    view: str | None
    jobs: list[Membership]
    predictions: list[PredictionRecord]

    @property
    def latest(self) -> Membership | None:
        """Its record in the newest job that listed it."""
        return self.jobs[0] if self.jobs else None


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
    state = JobStatus(job.state)
    detail = job.detail
    if state is JobStatus.running and runner_gone(job.runner):
        state, detail = JobStatus.interrupted, "its screen process is gone; run the same command again"
    progress = JobProgress(
        job_id=job.id,
        source=job.source,
        bundle_id=job.bundle_id,
        options=job.options or {},
        state=state,
        created_at=as_utc(job.created_at),
        finished_at=as_utc(job.finished_at),
        detail=detail,
        runner=job.runner,
    )
    of_job = job_images.c.job_id == job.id
    counts = {state.value: 0 for state in ImageStatus}
    for image_state, count in conn.execute(
        sa.select(job_images.c.state, sa.func.count()).where(of_job).group_by(job_images.c.state)
    ):
        counts[ImageStatus(image_state).value] = count
    progress.counts = counts
    progress.total = sum(counts.values())
    progress.failed_by_reason = {
        reason or "unknown": count
        for reason, count in conn.execute(
            sa.select(job_images.c.failure_reason, sa.func.count())
            .where(of_job, job_images.c.state == ImageStatus.failed)
            .group_by(job_images.c.failure_reason)
            .order_by(sa.func.count().desc())
        )
    }
    progress.flagged = conn.execute(
        sa.select(sa.func.count())
        .select_from(job_images.join(predictions, predictions.c.id == job_images.c.prediction_id))
        .where(of_job, job_images.c.state == ImageStatus.scored, predictions.c.ensemble_decision.is_(True))
    ).scalar_one()
    progress.reused = conn.execute(
        sa.select(sa.func.count()).where(of_job, job_images.c.reused.is_(True))
    ).scalar_one()

    now = utcnow()
    newest = conn.execute(sa.select(sa.func.max(job_images.c.updated_at)).where(of_job)).scalar()
    progress.last_progress_at = max(progress.created_at, as_utc(newest) or progress.created_at)
    if state is not JobStatus.running:
        return progress
    progress.rate_per_s = finished_rate(conn, job.id, progress.created_at, now)
    if progress.queued and progress.rate_per_s > 0:
        progress.eta_s = progress.queued / progress.rate_per_s
    elif not progress.queued:
        progress.eta_s = 0.0
    progress.stalled = (
        stall_after is not None
        and progress.queued > 0
        and (now - progress.last_progress_at).total_seconds() > stall_after
    )
    return progress


def finished_rate(conn: Connection, job_id: int, created_at: datetime, now: datetime) -> float:
    """Images a job finished (scored or failed, not reused) per second over the last RATE_WINDOW_S."""
    recent = conn.execute(
        sa.select(sa.func.count()).where(
            job_images.c.job_id == job_id,
            job_images.c.state.in_([ImageStatus.scored, ImageStatus.failed]),
            job_images.c.reused.is_(False),
            job_images.c.updated_at >= now - timedelta(seconds=RATE_WINDOW_S),
        )
    ).scalar_one()
    window = min(RATE_WINDOW_S, max((now - created_at).total_seconds(), 1.0))
    return recent / window


def _job_bundle(conn: Connection, job_id: int) -> str:
    bundle_id = conn.execute(sa.select(scan_jobs.c.bundle_id).where(scan_jobs.c.id == job_id)).scalar()
    if bundle_id is None:
        raise UnknownJob(f"no scan job {job_id}")
    return bundle_id


def _probabilities(row: Any) -> dict[str, float | None]:
    return {arch: getattr(row, f"{arch}_probability") for arch in ARCHITECTURES}


def _members(job_id: int) -> sa.Select[Any]:
    """The job's images joined to their memberships and the predictions they resolved to."""
    joined = job_images.join(images, images.c.id == job_images.c.image_id).outerjoin(
        predictions, predictions.c.id == job_images.c.prediction_id
    )
    return sa.select().select_from(joined).where(job_images.c.job_id == job_id)


def _flagged(stmt: sa.Select[Any]) -> sa.Select[Any]:
    """Only the flagged images, the most suspicious first: the order a reviewer works in."""
    return stmt.where(
        job_images.c.state == ImageStatus.scored, predictions.c.ensemble_decision.is_(True)
    ).order_by(predictions.c.ensemble_score.desc(), images.c.id)


def flagged_images(engine: Engine, job_id: int, limit: int | None = None) -> list[FlaggedImage]:
    """The job's images the ensemble flagged, highest ensemble score first."""
    with engine.connect() as conn:
        _job_bundle(conn, job_id)
        stmt = _flagged(
            _members(job_id).add_columns(
                images.c.uri,
                images.c.study_uid,
                images.c.series_uid,
                images.c.sop_uid,
                images.c.view,
                predictions,
            )
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return [_record(FlaggedImage, row, probabilities=_probabilities(row)) for row in conn.execute(stmt)]


def iter_results(
    engine: Engine, job_id: int, flagged_only: bool = False, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """Every image of the job (scored, failed, queued, cancelled) as a dict keyed by RESULT_FIELDS, in
    registration order; ``flagged_only``: the flagged images, highest ensemble score first.

    Streams: rows come from a server-side cursor ``batch_size`` at a time, so memory does not grow
    with the job. Keep the iterator short-lived: it holds a connection until exhausted or closed.
    """
    with engine.connect() as conn:
        _job_bundle(conn, job_id)
        stmt = _members(job_id).add_columns(*(column.label(name) for name, column in _RESULT_COLUMNS.items()))
        stmt = stmt.outerjoin(
            heatmaps,
            sa.and_(heatmaps.c.image_id == images.c.id, heatmaps.c.bundle_id == predictions.c.bundle_id),
        )
        stmt = _flagged(stmt) if flagged_only else stmt.order_by(images.c.id)
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
    """For each of these URIs the job has: (no longer queued in it, its attempt count there)."""
    out: dict[str, tuple[bool, int]] = {}
    with engine.connect() as conn:
        for listed in uri_batches(conn.dialect.name, uris, IN_BATCH):
            rows = conn.execute(
                sa.select(images.c.uri, job_images.c.state, job_images.c.attempts)
                .select_from(job_images.join(images, images.c.id == job_images.c.image_id))
                .where(job_images.c.job_id == job_id, listed)
            )
            for uri, state, attempts in rows:
                out[uri] = (state is not ImageStatus.queued, int(attempts or 0))
    return out


@dataclass
class Membership:
    """One job's record of an image: its state there and the prediction it resolved to."""

    job_id: int
    state: ImageStatus
    attempts: int
    failure_reason: str | None
    failure_detail: str | None
    prediction_id: int | None
    reused: bool
    updated_at: datetime | None


def image_audit(engine: Engine, uri: str) -> ImageAudit | None:
    """What the database knows about one image (None when it was never registered): every job it was
    in, newest first, and every prediction made of it."""
    with engine.connect() as conn:
        image = conn.execute(sa.select(images).where(images.c.uri == uri)).one_or_none()
        if image is None:
            return None
        records = [
            _record(PredictionRecord, row, scored_at=as_utc(row.scored_at), probabilities=_probabilities(row))
            for row in conn.execute(
                sa.select(predictions)
                .where(predictions.c.image_id == image.id)
                .order_by(predictions.c.scored_at.desc(), predictions.c.id.desc())
            )
        ]
        jobs = [
            _record(Membership, row, state=ImageStatus(row.state), updated_at=as_utc(row.updated_at))
            for row in conn.execute(
                sa.select(job_images)
                .where(job_images.c.image_id == image.id)
                .order_by(job_images.c.job_id.desc())
            )
        ]
    return _record(ImageAudit, image, updated_at=as_utc(image.updated_at), jobs=jobs, predictions=records)


def _record(cls: type[R], row: sa.Row[Any], **computed: Any) -> R:
    """One of the dataclasses above from a row: fields named like the row's columns are copied from it,
    ``computed`` gives the others (and overrides, e.g. timestamps made timezone-aware)."""
    columns = row._mapping
    copied = {f.name: columns[f.name] for f in fields(cls) if f.name in columns and f.name not in computed}
    return cls(**copied, **computed)
