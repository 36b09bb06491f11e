"""Sending a job's images back to the workers: its failures (after fixing storage), its stuck queue, or
the queues of every stalled job (the reaper, ``requeue --stalled``, fit for cron).

Safe to repeat: results are written once per image and bundle, so an image sent twice is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy.engine import Engine

from db.jobs import requeue_failed, resend_queued
from db.queries import JobProgress, UnknownJob, job_progress, list_jobs
from db.schema import open_database
from deepcovid.chunking import batched
from deepcovid.errors import REASONS, UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.queue import make_celery, send_chunk
from deepcovid.settings import Settings, get_settings
from producer.preflight import check_broker


@dataclass(frozen=True)
class RequeueSummary:
    """How many images went back to the workers, in how many task messages."""

    job_id: int
    images: int
    chunks: int


def find_job(engine: Engine, job_id: int, *, stall_after: float | None = None) -> JobProgress:
    """The job's progress, or a UserError pointing at the command that lists jobs."""
    try:
        return job_progress(engine, job_id, stall_after=stall_after)
    except UnknownJob:
        raise UserError(ExitCode.FAILURES, f"no job {job_id} (see `deepcovid jobs`)") from None


def requeue(
    job_id: int,
    *,
    failed: bool = False,
    queued: bool = False,
    reason: str | None = None,
    chunk_size: int | None = None,
    settings: Settings | None = None,
    app: Celery | None = None,
) -> RequeueSummary:
    """Re-send the job's still-queued images (``queued``) and put its failed ones (``failed``, only those
    failed for ``reason`` if given) back in the queue; checks the reason, the job and the broker first."""
    if reason is not None and reason not in REASONS:
        raise UserError(ExitCode.USAGE, f"unknown reason {reason!r}; one of {', '.join(REASONS)}")
    settings = settings or get_settings()
    engine = open_database(settings, write=True)
    job = find_job(engine, job_id)
    app = app or make_celery(settings)
    check_broker(app)
    uris = resend_queued(engine, job_id) if queued else []
    if failed:
        uris += requeue_failed(engine, job_id, reason=reason)
    return _send(app, job, uris, chunk_size or settings.chunk_size)


def requeue_stalled(
    *, chunk_size: int | None = None, settings: Settings | None = None, app: Celery | None = None
) -> list[RequeueSummary]:
    """Re-send the queued images of every stalled job (see ``Settings.effective_stall_after``)."""
    settings = settings or get_settings()
    engine = open_database(settings, write=True)
    app = app or make_celery(settings)
    check_broker(app)
    stalled = [
        job
        for job in list_jobs(engine, stall_after=settings.effective_stall_after, running_only=True)
        if job.stalled
    ]
    return [
        _send(app, job, resend_queued(engine, job.job_id), chunk_size or settings.chunk_size)
        for job in reversed(stalled)  # oldest first
    ]


def _send(app: Celery, job: JobProgress, uris: list[str], chunk_size: int) -> RequeueSummary:
    chunks = 0
    for chunk in batched(uris, chunk_size):
        send_chunk(app, job.job_id, job.bundle_id, chunk)
        chunks += 1
    return RequeueSummary(job_id=job.job_id, images=len(uris), chunks=chunks)
