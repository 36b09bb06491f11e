"""Check a task message before acting on it: a message is input, and it may not come from ``enqueue``.

A message that fails these checks is rejected (not retried, no row written) and logged by its task id
and the check it failed, never with its URIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.tables import bundles, scan_jobs
from deepcovid.settings import Settings
from deepcovid.status import JobStatus

MAX_URI_LENGTH = 4096  # PATH_MAX on Linux; S3 keys are at most 1024 bytes


class InvalidMessage(ValueError):
    """A task message this worker refuses; the text names the check that failed and no URI."""


@dataclass(frozen=True)
class ChunkMessage:
    """A chunk message whose arguments have the right shape (the database is checked separately)."""

    job_id: int
    bundle_id: str
    uris: list[str]


def parse_message(job_id: Any, bundle_id: Any, uris: Any, settings: Settings) -> ChunkMessage:
    """The message's arguments, typed, or InvalidMessage when their shape is wrong."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id <= 0:
        raise InvalidMessage("job_id is not a positive integer")
    if not isinstance(bundle_id, str) or not bundle_id or len(bundle_id) > 128:
        raise InvalidMessage("bundle_id is not a bundle id string")
    if not isinstance(uris, list):
        raise InvalidMessage(f"uris is a {type(uris).__name__}, not a list")
    if len(uris) > settings.max_chunk_uris:
        raise InvalidMessage(
            f"{len(uris)} URIs, more than DEEPCOVID_MAX_CHUNK_URIS={settings.max_chunk_uris}"
        )
    for position, uri in enumerate(uris):
        problem = _uri_problem(uri)
        if problem:
            raise InvalidMessage(f"URI #{position} {problem}")
    return ChunkMessage(job_id, bundle_id, list(uris))


def _uri_problem(uri: Any) -> str:
    """Why ``uri`` cannot even be looked up as an image address ('' when it can).

    A well-formed string that storage refuses (a relative path, a path outside the roots, a bucket not
    allowed) is not the message's fault: that image alone fails with its reason, as it would if its
    file had moved, and the rest of the chunk is scored.
    """
    if not isinstance(uri, str):
        return f"is a {type(uri).__name__}, not a string"
    if not uri or "\x00" in uri or len(uri) > MAX_URI_LENGTH:
        return "is empty, too long or holds a NUL byte"
    return ""


def check_job(engine: Engine, message: ChunkMessage) -> None:
    """The job exists and is running, and the message names the job's bundle, which is registered."""
    with engine.connect() as conn:
        job = conn.execute(
            sa.select(scan_jobs.c.state, scan_jobs.c.bundle_id).where(scan_jobs.c.id == message.job_id)
        ).one_or_none()
        if job is None:
            raise InvalidMessage(f"job {message.job_id} does not exist")
        if JobStatus(job.state) is not JobStatus.running:
            raise InvalidMessage(f"job {message.job_id} is {JobStatus(job.state).value}, not running")
        if job.bundle_id != message.bundle_id:
            raise InvalidMessage(f"the bundle is not job {message.job_id}'s bundle")
        registered = conn.execute(
            sa.select(bundles.c.bundle_id).where(bundles.c.bundle_id == message.bundle_id)
        ).one_or_none()
    if registered is None:
        raise InvalidMessage(f"job {message.job_id}'s bundle is not registered")
