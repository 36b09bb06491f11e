"""A scan job's lifecycle: created running; finished once nothing is queued; interrupted and resumed;
failed with its reason; closed (its unfinished images cancelled); pruned.

Images join a job through ``db.writes.register_images`` and get their results from
``db.writes.write_results``; the transitions of the job (and of its images as a whole) live here. Every
statement touches only the job's own memberships, so no transition of one job changes another.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.engine import writer
from db.models import utcnow
from db.tables import images, job_images, predictions, scan_jobs
from db.writes import image_ids
from deepcovid.chunking import batched
from deepcovid.defaults import IN_BATCH
from deepcovid.errors import REASONS
from deepcovid.status import ImageStatus, JobStatus


def this_runner() -> str:
    """``host:pid`` of this process, recorded on a job ``screen`` works on in-process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_gone(runner: str | None) -> bool:
    """True when ``runner`` is a process of this host that no longer exists: its job has nobody working
    on it. A runner on another host cannot be checked from here and counts as alive."""
    host, _, pid = (runner or "").rpartition(":")
    if not host or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def create_job(
    engine: Engine,
    *,
    source: str,
    bundle_id: str,
    options: dict[str, Any] | None = None,
    runner: str | None = None,
) -> int:
    """Start a scan job; ``runner`` names the process working on it when it is not the workers."""
    with writer(engine).begin() as conn:
        return conn.execute(
            sa.insert(scan_jobs)
            .values(
                source=source,
                bundle_id=bundle_id,
                options=options or {},
                state=JobStatus.running,
                runner=runner,
                created_at=utcnow(),
            )
            .returning(scan_jobs.c.id)
        ).scalar_one()


def get_job(engine: Engine, job_id: int) -> sa.Row[Any] | None:
    """The job's row (None when there is no such job)."""
    with engine.connect() as conn:
        return conn.execute(sa.select(scan_jobs).where(scan_jobs.c.id == job_id)).one_or_none()


def can_resume(job: sa.Row[Any]) -> bool:
    """An interrupted job, or a running one whose ``screen`` process is gone: nobody works on it."""
    state = JobStatus(job.state)
    return state is JobStatus.interrupted or (state is JobStatus.running and runner_gone(job.runner))


def find_resumable(engine: Engine, *, source: str, bundle_id: str, options: dict[str, Any]) -> int | None:
    """The newest job of the same ``screen`` command (source, bundle, options) that nobody works on."""
    with engine.connect() as conn:
        jobs = conn.execute(
            sa.select(scan_jobs)
            .where(
                scan_jobs.c.source == source,
                scan_jobs.c.bundle_id == bundle_id,
                scan_jobs.c.state.in_(_UNFINISHED),
            )
            .order_by(scan_jobs.c.id.desc())
        ).all()
    return next((job.id for job in jobs if job.options == options and can_resume(job)), None)


def _queued(job_id: int) -> sa.ColumnElement[bool]:
    return sa.and_(job_images.c.job_id == job_id, job_images.c.state == ImageStatus.queued)


def finish_job_if_done(engine: Engine, job_id: int) -> bool:
    """Mark a running job finished once none of its images is queued; True when the job is finished."""
    with writer(engine).begin() as conn:
        conn.execute(
            sa.update(scan_jobs)
            .where(
                scan_jobs.c.id == job_id,
                scan_jobs.c.state == JobStatus.running,
                ~sa.exists().where(_queued(job_id)),
            )
            .values(state=JobStatus.finished, finished_at=utcnow(), runner=None, detail=None)
        )
        state = conn.execute(
            sa.select(scan_jobs.c.state).where(scan_jobs.c.id == job_id)
        ).scalar_one_or_none()
    return state == JobStatus.finished


def resume_job(engine: Engine, job_id: int, runner: str | None) -> None:
    """Take up an interrupted (or orphaned running) job again: running, with this runner."""
    with writer(engine).begin() as conn:
        conn.execute(
            sa.update(scan_jobs)
            .where(scan_jobs.c.id == job_id)
            .values(state=JobStatus.running, runner=runner, detail=None, finished_at=None)
        )


def stop_job(engine: Engine, job_id: int, state: JobStatus, detail: str) -> None:
    """End a running job's run as ``interrupted`` (resumable) or ``failed``, saying why.

    Its queued images stay queued in it, so resuming picks them up; nothing else changes.
    """
    if state not in (JobStatus.interrupted, JobStatus.failed):
        raise ValueError(f"a run stops as interrupted or failed, not {state.value}")
    with writer(engine).begin() as conn:
        conn.execute(
            sa.update(scan_jobs)
            .where(scan_jobs.c.id == job_id, scan_jobs.c.state == JobStatus.running)
            .values(state=state, detail=detail, runner=None, finished_at=utcnow())
        )


def close_job(engine: Engine, job_id: int) -> int:
    """End an unfinished job for good: its queued images become ``cancelled``; returns how many did.

    A job with nothing left queued is finished instead of cancelled.
    """
    with writer(engine).begin() as conn:
        cancelled = conn.execute(
            sa.update(job_images)
            .where(_queued(job_id))
            .values(state=ImageStatus.cancelled, updated_at=utcnow())
        ).rowcount
        conn.execute(
            sa.update(scan_jobs)
            .where(scan_jobs.c.id == job_id, scan_jobs.c.state.in_(_UNFINISHED))
            .values(
                state=JobStatus.cancelled if cancelled else JobStatus.finished,
                runner=None,
                finished_at=utcnow(),
            )
        )
    return cancelled


_UNFINISHED = (JobStatus.running, JobStatus.interrupted)


def _uris(conn: Connection, ids: Sequence[int]) -> list[str]:
    """The URIs of these image ids, in id (registration) order."""
    uris: list[str] = []
    for batch in batched(sorted(set(ids)), IN_BATCH):
        uris.extend(
            conn.execute(
                sa.select(images.c.uri).where(images.c.id.in_(batch)).order_by(images.c.id)
            ).scalars()
        )
    return uris


def requeue_failed(engine: Engine, job_id: int, reason: str | None = None) -> list[str]:
    """Put a job's failed images (optionally only those failed for ``reason``) back in the queue."""
    with writer(engine).begin() as conn:
        stmt = (
            sa.update(job_images)
            .where(job_images.c.job_id == job_id, job_images.c.state == ImageStatus.failed)
            .values(
                state=ImageStatus.queued,
                attempts=0,
                failure_reason=None,
                failure_detail=None,
                updated_at=utcnow(),
            )
            .returning(job_images.c.image_id)
        )
        if reason is not None:
            stmt = stmt.where(job_images.c.failure_reason == reason)
        ids = list(conn.execute(stmt).scalars())
        if ids:
            conn.execute(
                sa.update(scan_jobs)
                .where(scan_jobs.c.id == job_id)
                .values(state=JobStatus.running, finished_at=None, detail=None)
            )
        return _uris(conn, ids)


def resend_queued(engine: Engine, job_id: int) -> list[str]:
    """The job's still-queued images, in listing order, stamped as just re-sent: re-sending is progress,
    so the stall window starts again and a reaper run does not send them twice in a row."""
    with writer(engine).begin() as conn:
        ids = conn.execute(
            sa.update(job_images)
            .where(_queued(job_id))
            .values(updated_at=utcnow())
            .returning(job_images.c.image_id)
        ).scalars()
        return _uris(conn, list(ids))


def mark_failed(engine: Engine, job_id: int, uris: Sequence[str], reason: str, detail: str = "") -> list[str]:
    """Fail a job's still-queued images (e.g. ``crashed_worker``); returns the URIs it changed."""
    if reason not in REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    with writer(engine).begin() as conn:
        ids = list(image_ids(conn, uris).values())
        changed: list[int] = []
        for batch in batched(ids, IN_BATCH):
            changed.extend(
                conn.execute(
                    sa.update(job_images)
                    .where(_queued(job_id), job_images.c.image_id.in_(batch))
                    .values(
                        state=ImageStatus.failed,
                        failure_reason=reason,
                        failure_detail=detail or REASONS[reason],
                        updated_at=utcnow(),
                    )
                    .returning(job_images.c.image_id)
                ).scalars()
            )
        return _uris(conn, changed)


@dataclass(frozen=True)
class Pruned:
    """What ``prune_jobs`` removed."""

    jobs: int
    predictions: int
    images: int


def prune_jobs(engine: Engine, before: datetime, *, dry_run: bool = False) -> Pruned:
    """Delete the jobs created before ``before`` that are not running, with their memberships, then the
    predictions and images no remaining job refers to. The only way history is removed."""
    with writer(engine).begin() as conn:
        old = sa.select(scan_jobs.c.id).where(
            scan_jobs.c.created_at < before, scan_jobs.c.state != JobStatus.running
        )
        job_ids = list(conn.execute(old).scalars())
        if dry_run or not job_ids:
            return Pruned(jobs=len(job_ids), predictions=0, images=0)
        for batch in batched(job_ids, IN_BATCH):
            conn.execute(sa.delete(job_images).where(job_images.c.job_id.in_(batch)))
            conn.execute(sa.delete(scan_jobs).where(scan_jobs.c.id.in_(batch)))
        # Deleting the jobs set their predictions' job to NULL (ON DELETE SET NULL).
        orphan_predictions = conn.execute(
            sa.delete(predictions).where(
                predictions.c.job_id.is_(None),
                ~sa.exists().where(job_images.c.prediction_id == predictions.c.id),
            )
        ).rowcount
        orphan_images = conn.execute(
            sa.delete(images).where(
                ~sa.exists().where(job_images.c.image_id == images.c.id),
                ~sa.exists().where(predictions.c.image_id == images.c.id),
            )
        ).rowcount
    return Pruned(jobs=len(job_ids), predictions=orphan_predictions, images=orphan_images)
