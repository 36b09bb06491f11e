"""The worklist header: a job's scored, failed and queued counts and its rate, cheap enough for every page
view of a 100,000-image job (counts by state come from the (job, state) index; no join to predictions,
unlike ``db.queries.job_progress``, whose flagged and reused counts read every prediction)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.jobs import runner_gone
from db.models import as_utc, utcnow
from db.queries import UnknownJob, finished_rate
from db.tables import job_images, scan_jobs
from deepcovid.status import ImageStatus, JobStatus


@dataclass
class JobHeader:
    job_id: int
    state: JobStatus
    bundle_id: str
    counts: dict[ImageStatus, int]
    rate_per_s: float | None  # images finished per second over the last minute, while running

    @property
    def scored(self) -> int:
        return self.counts[ImageStatus.scored]

    @property
    def failed(self) -> int:
        return self.counts[ImageStatus.failed]

    @property
    def queued(self) -> int:
        return self.counts[ImageStatus.queued]


def job_header(engine: Engine, job_id: int) -> JobHeader:
    """Raises UnknownJob."""
    with engine.connect() as conn:
        job = conn.execute(sa.select(scan_jobs).where(scan_jobs.c.id == job_id)).first()
        if job is None:
            raise UnknownJob(f"no scan job {job_id}")
        of_job = job_images.c.job_id == job_id
        counts = dict.fromkeys(ImageStatus, 0)
        for state, count in conn.execute(
            sa.select(job_images.c.state, sa.func.count()).where(of_job).group_by(job_images.c.state)
        ):
            counts[ImageStatus(state)] = count
        state = JobStatus(job.state)
        if state is JobStatus.running and runner_gone(job.runner):
            state = JobStatus.interrupted
        rate = None
        if state is JobStatus.running:
            rate = finished_rate(conn, job_id, as_utc(job.created_at), utcnow())
    return JobHeader(job_id, state, job.bundle_id, counts, rate)
