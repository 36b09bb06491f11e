"""A scan job's lifecycle: created running, finished once nothing is queued, requeued, cancelled.

Images are attached to a job by ``db.writes.register_images`` and given their results by
``db.writes.write_results``; the transitions of the job (and of its images as a whole) live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.engine import writer
from db.models import utcnow
from db.tables import held_by, images, scan_jobs, uri_batches
from deepcovid.defaults import IN_BATCH
from deepcovid.errors import REASONS
from deepcovid.status import ImageStatus, JobStatus


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


def resend_queued(engine: Engine, job_id: int) -> list[str]:
    """The job's still-queued images, in listing order, stamped as just re-sent: re-sending is progress,
    so the stall window starts again and a reaper run does not send them twice in a row."""
    with writer(engine).begin() as conn:
        rows = conn.execute(
            sa.update(images)
            .where(images.c.last_job_id == job_id, images.c.state == ImageStatus.queued)
            .values(updated_at=utcnow())
            .returning(images.c.id, images.c.uri)
        ).all()
    return [uri for _id, uri in sorted(rows)]


def mark_failed(engine: Engine, job_id: int, uris: Sequence[str], reason: str, detail: str = "") -> list[str]:
    """Fail a job's still-queued images (e.g. ``crashed_worker``); returns the URIs it changed."""
    if reason not in REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    changed: list[str] = []
    with writer(engine).begin() as conn:
        for listed in uri_batches(conn.dialect.name, uris, IN_BATCH):
            stmt = (
                sa.update(images)
                .where(listed, images.c.state == ImageStatus.queued, held_by(job_id))
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
