"""The ``deepcovid.score_chunk`` task: score a chunk of URIs and write the results in one transaction.

Delivery is at-least-once (acks late, reject on worker lost), so the task is idempotent: images this
job already finished are skipped, and results are upserted on (image, bundle). When a chunk comes back
after its worker died, its images are scored one at a time so that a single image that kills the
worker (a decoder crash, an out-of-memory kill) is isolated and eventually failed as
``crashed_worker`` while the others get scored.

The ensemble (torch) is imported inside the task, after the prefork pool has forked, so CUDA is never
initialised in the parent process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from botocore import exceptions as botocore_errors
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.engine import Engine

from db.jobs import finish_job_if_done
from db.queries import chunk_state
from db.schema import DatabaseUnreachable, SchemaNotCurrent, open_database
from db.writes import record_attempts, write_results
from deepcovid.bundle import BundleError, find_bundle
from deepcovid.defaults import MAX_CACHED_ENSEMBLES, MAX_RETRIES
from deepcovid.errors import TransientError
from deepcovid.queue import TASK_NAME
from deepcovid.results import ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.status import ImageStatus
from deepcovid.storage import Storage, open_storage
from worker import app

if TYPE_CHECKING:
    from deepcovid.ensemble import Ensemble

log = logging.getLogger(__name__)

# Per-process state, created on first use in the process that scores (after the fork).
_pid: int | None = None
_ensembles: dict[str, Ensemble] = {}
_storages: dict[int, tuple[Settings, Storage]] = {}
_databases: dict[str, Engine] = {}  # by URL: reachability and schema checked once per process


def _reset_after_fork() -> None:
    global _pid
    if _pid != os.getpid():
        _pid = os.getpid()
        _ensembles.clear()
        _storages.clear()
        _databases.clear()


def _engine_for(settings: Settings) -> Engine:
    """The results database, opened (reachable, schema current) once per process and URL."""
    _reset_after_fork()
    url = settings.effective_database_url
    engine = _databases.get(url)
    if engine is None:
        engine = _databases[url] = open_database(settings)
    return engine


def _storage_for(settings: Settings) -> Storage:
    _reset_after_fork()
    cached = _storages.get(id(settings))
    if cached is None or cached[0] is not settings:
        cached = (settings, open_storage(settings))
        _storages.clear()
        _storages[id(settings)] = cached
    return cached[1]


def _ensemble_for(bundle_id: str, settings: Settings) -> Ensemble:
    """Load a bundle's ensemble once per worker process (the first task pays for it)."""
    _reset_after_fork()
    ensemble = _ensembles.get(bundle_id)
    if ensemble is not None:
        return ensemble
    from deepcovid.ensemble import Ensemble  # torch: only after the fork, CUDA never in the parent

    bundle = find_bundle(bundle_id, settings.effective_bundles_dir)
    ensemble = Ensemble.from_bundle(bundle, device=settings.device, settings=settings)
    while len(_ensembles) >= MAX_CACHED_ENSEMBLES:
        _ensembles.pop(next(iter(_ensembles)))
    _ensembles[bundle_id] = ensemble
    log.info("loaded bundle %s on %s", bundle_id, ensemble.device)
    return ensemble


def retryable_errors() -> tuple[type[BaseException], ...]:
    """Failures that are not the images' fault: the chunk is retried later with backoff."""
    return (
        TransientError,
        sqlalchemy_errors.OperationalError,
        sqlalchemy_errors.DisconnectionError,
        sqlalchemy_errors.InterfaceError,
        botocore_errors.ConnectionError,
        botocore_errors.HTTPClientError,
        DatabaseUnreachable,
        # Deployment problems an operator fixes while the chunk waits: schema not migrated, bundle
        # not installed on this worker.
        SchemaNotCurrent,
        BundleError,
    )


def run_chunk(
    job_id: int,
    bundle_id: str,
    uris: Sequence[str],
    *,
    settings: Settings,
    redelivered: bool = False,
) -> dict[str, Any]:
    """Score the chunk's unfinished images and record them; returns counts (no URIs) for Flower."""
    from deepcovid.pipeline import score_chunk as score_uris  # torch: only after the fork

    engine = _engine_for(settings)
    storage = _storage_for(settings)
    state = chunk_state(engine, job_id, uris)
    todo = [u for u in dict.fromkeys(uris) if not state.get(u, (False, 0))[0]]
    summary: dict[str, Any] = {"job_id": job_id, "images": len(uris), "skipped": len(uris) - len(todo)}
    summary.update(scored=0, failed=0, isolated=False)
    if not todo:
        finish_job_if_done(engine, job_id)
        return summary

    ensemble = _ensemble_for(bundle_id, settings)
    host = socket.gethostname()
    device = ensemble.label

    def write(results: list[ImageResult]) -> None:
        write_results(
            engine, job_id=job_id, bundle_id=bundle_id, results=results, worker_host=host, device=device
        )
        summary["scored"] += sum(r.scored for r in results)
        summary["failed"] += sum(r.status is ImageStatus.failed for r in results)

    # A previous delivery of this chunk died mid-way (or isolated some of these images before).
    isolate = redelivered or any(state.get(u, (False, 0))[1] >= 1 for u in todo)
    if not isolate:
        write(score_uris(todo, storage=storage, ensemble=ensemble, settings=settings))
    else:
        summary["isolated"] = True
        log.warning(
            "job %d: chunk redelivered after a worker died; scoring its %d unfinished images one at a time",
            job_id,
            len(todo),
        )
        for uri in todo:
            # Counted before scoring, so an image that kills the worker accumulates attempts.
            attempts = record_attempts(engine, [uri]).get(uri, 0)
            if attempts >= settings.max_attempts:
                log.error(
                    "job %d: an image killed its worker %d times; failing it as crashed_worker",
                    job_id,
                    attempts,
                )
                detail = (
                    f"its chunk killed the worker {attempts} times "
                    f"(DEEPCOVID_MAX_ATTEMPTS={settings.max_attempts})"
                )
                write([ImageResult.failed(uri, "crashed_worker", detail)])
                continue
            write(score_uris([uri], storage=storage, ensemble=ensemble, settings=settings))
    finish_job_if_done(engine, job_id)
    return summary


@app.task(bind=True, name=TASK_NAME, max_retries=MAX_RETRIES)
def score_chunk(self: Any, job_id: int, bundle_id: str, uris: list[str]) -> dict[str, Any]:
    """Score one chunk of image URIs with bundle ``bundle_id`` and record the results for job ``job_id``."""
    settings = get_settings()
    delivery_info = self.request.delivery_info or {}
    try:
        return run_chunk(
            int(job_id),
            str(bundle_id),
            [str(u) for u in uris],
            settings=settings,
            redelivered=bool(delivery_info.get("redelivered")),
        )
    except retryable_errors() as exc:
        countdown = min(2**self.request.retries, settings.retry_backoff_max)
        log.warning(
            "job %s: %s (%s); retrying the chunk in %ds", job_id, type(exc).__name__, _short(exc), countdown
        )
        raise self.retry(exc=exc, countdown=countdown) from exc


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, bounded: enough to act on, no tracebacks."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:300]
