"""The ``deepcovid.score_chunk`` task: score a chunk of URIs, committing results batch by batch.

Delivery is at-least-once (acks late, reject on worker lost, requeue at the hard time limit), so the task
is idempotent: images this job already finished are skipped, and results are upserted on (image, bundle).
When a chunk comes back after its worker died, its images are scored one at a time so that a single image
that kills the worker (a decoder crash, an out-of-memory kill) is isolated and eventually failed as
``crashed_worker`` while the others get scored.

A chunk is acknowledged only when each of its images is finished (scored or failed) or re-sent:
- a message that fails validation (worker.validation) is rejected without requeue and writes nothing;
- a transient error (database, S3) retries the whole chunk with backoff, for as long as it takes;
- the soft time limit or an unexpected error commits what finished, counts an attempt for the rest and
  re-sends them in two smaller chunks; an image out of attempts fails as ``timed_out`` or ``internal_error``;
- a bundle that cannot be loaded fails the chunk's images as ``bundle_unusable`` (requeue after fixing it);
- when re-sending or recording fails, the message is rejected with requeue, so it is never lost.

The ensemble (torch) is imported inside the task, after the prefork pool has forked, so CUDA is never
initialised in the parent process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from billiard.exceptions import SoftTimeLimitExceeded
from botocore import exceptions as botocore_errors
from celery.exceptions import Reject
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy.engine import Engine

from db.jobs import finish_job_if_done
from db.queries import chunk_state
from db.schema import DatabaseUnreachable, SchemaNotCurrent, open_database
from db.writes import record_attempts, write_results
from deepcovid.artifacts import ArtifactStore, RefusedArtifacts, open_artifacts
from deepcovid.bundle import BundleError, find_bundle
from deepcovid.defaults import MAX_CACHED_ENSEMBLES, MAX_RETRIES
from deepcovid.errors import REASONS, TransientError, UserError
from deepcovid.queue import TASK_NAME, chunk_reprs, send_chunk
from deepcovid.results import ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.status import ImageStatus
from deepcovid.storage import Storage, open_storage
from worker import app
from worker.validation import ChunkMessage, InvalidMessage, check_job, parse_message

if TYPE_CHECKING:
    from deepcovid.ensemble import Ensemble

log = logging.getLogger(__name__)

# Per-process state, created on first use in the process that scores (after the fork).
_pid: int | None = None
_ensembles: dict[str, Ensemble] = {}
_storages: dict[int, tuple[Settings, Storage]] = {}
_databases: dict[str, Engine] = {}  # by URL: reachability and schema checked once per process
_artifacts: dict[int, tuple[Settings, ArtifactStore]] = {}


def _reset_after_fork() -> None:
    global _pid
    if _pid != os.getpid():
        _pid = os.getpid()
        _ensembles.clear()
        _storages.clear()
        _databases.clear()
        _artifacts.clear()


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


def _artifacts_for(settings: Settings) -> ArtifactStore:
    """The artifact store for Grad-CAM maps; one ``deepcovid worker`` refused at start-up (inside the
    archive) fails every map, never a score."""
    _reset_after_fork()
    cached = _artifacts.get(id(settings))
    if cached is None or cached[0] is not settings:
        try:
            store: ArtifactStore = open_artifacts(settings)
        except UserError as exc:
            log.error("no Grad-CAM maps will be stored: %s", exc)
            store = RefusedArtifacts("DEEPCOVID_ARTIFACTS is refused: it lies inside the archive")
        cached = (settings, store)
        _artifacts.clear()
        _artifacts[id(settings)] = cached
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
        # A deployment problem an operator fixes while the chunk waits: the schema not migrated.
        SchemaNotCurrent,
    )


class _Chunk:
    """One delivery of a chunk: what is finished, what was counted, and how to commit results."""

    def __init__(self, engine: Engine, message: ChunkMessage, settings: Settings, device: str) -> None:
        self.engine = engine
        self.message = message
        self.settings = settings
        self.device = device
        self.host = socket.gethostname()
        self.finished: set[str] = set()
        self.counted: set[str] = set()  # attempts already recorded for this delivery
        self.summary: dict[str, Any] = {"job_id": message.job_id, "images": len(message.uris)}
        self.summary.update(skipped=0, scored=0, failed=0, isolated=False, resent=0)

    def write(self, results: list[ImageResult]) -> None:
        write_results(
            self.engine,
            job_id=self.message.job_id,
            bundle_id=self.message.bundle_id,
            results=results,
            worker_host=self.host,
            device=self.device,
        )
        self.finished.update(r.uri for r in results)
        self.summary["scored"] += sum(r.scored for r in results)
        self.summary["failed"] += sum(r.status is ImageStatus.failed for r in results)

    def fail(self, uris: Sequence[str], reason: str, detail: str) -> None:
        self.write([ImageResult.failed(uri, reason, detail) for uri in uris])


def run_chunk(
    job_id: int,
    bundle_id: str,
    uris: Sequence[str],
    *,
    settings: Settings,
    redelivered: bool = False,
    resend: Callable[[ChunkMessage, list[str]], None] | None = None,
) -> dict[str, Any]:
    """Score the chunk's unfinished images and record them; returns counts (no URIs) for Flower.

    ``resend(message, uris)`` sends a smaller chunk of this job with what a time limit or an unexpected
    error left unfinished (default: through this worker's broker, with the same argument reprs).
    """
    from deepcovid.pipeline import score_chunk as score_uris  # torch: only after the fork

    message = ChunkMessage(int(job_id), str(bundle_id), [str(u) for u in uris])
    engine = _engine_for(settings)
    storage = _storage_for(settings)
    artifacts = _artifacts_for(settings)
    state = chunk_state(engine, job_id, message.uris)
    # Only images registered by enqueue are scored: a message cannot add rows to a job.
    todo = [u for u in dict.fromkeys(message.uris) if u in state and not state[u][0]]
    if len(state) < len(set(message.uris)):
        log.warning(
            "job %d: %d URIs of the chunk are not registered; ignored",
            job_id,
            len(set(message.uris)) - len(state),
        )
    if not todo:
        finish_job_if_done(engine, job_id)
        summary = {"job_id": job_id, "images": len(message.uris), "skipped": len(message.uris)}
        return summary | {"scored": 0, "failed": 0, "isolated": False, "resent": 0}

    try:
        ensemble = _ensemble_for(message.bundle_id, settings)
    except BundleError as exc:
        chunk = _Chunk(engine, message, settings, device="")
        log.error(
            "job %d: the bundle cannot be used on this worker (%s); failing %d images as bundle_unusable",
            job_id,
            _short(exc),
            len(todo),
        )
        chunk.fail(todo, "bundle_unusable", _short(exc))
        finish_job_if_done(engine, job_id)
        return chunk.summary

    chunk = _Chunk(engine, message, settings, device=ensemble.label)
    chunk.summary["skipped"] = len(message.uris) - len(todo)
    # A previous delivery of this chunk died mid-way (or isolated some of these images before).
    isolate = redelivered or any(state.get(u, (False, 0))[1] >= 1 for u in todo)

    def score(uris: list[str]) -> None:
        score_uris(
            uris,
            storage=storage,
            ensemble=ensemble,
            settings=settings,
            on_results=chunk.write,
            artifacts=artifacts,
        )

    try:
        if not isolate:
            score(todo)
        else:
            _score_isolated(chunk, todo, redelivered, score)
    except retryable_errors():
        raise
    except SoftTimeLimitExceeded:
        log.warning("job %d: the chunk reached its soft time limit", job_id)
        _give_back(chunk, todo, "timed_out", resend)
    except Exception as exc:
        log.error("job %d: the chunk stopped on an unexpected %s", job_id, type(exc).__name__)
        log.debug("the chunk's unexpected error", exc_info=True)  # DEBUG: the traceback may name files
        _give_back(chunk, todo, "internal_error", resend)
    if settings.publish_to:
        _publish(engine, job_id, todo, settings, storage)
    finish_job_if_done(engine, job_id)
    return chunk.summary


def _publish(engine: Engine, job_id: int, uris: list[str], settings: Settings, storage: Storage) -> None:
    """DEEPCOVID_PUBLISH_TO: the chunk's reports go to the PACS as soon as they are scored. Each image's
    publish state is recorded; a failure never fails the chunk (`deepcovid publish JOB` sends again)."""
    from pacs.publish import Publisher, publish_job  # highdicom: only where publishing is configured

    try:
        summary = publish_job(
            engine,
            job_id,
            settings.publish_to or "",
            settings,
            uris=uris,
            publisher=Publisher(settings, storage),
        )
    except Exception as exc:
        log.warning("job %d: the chunk's reports were not published (%s)", job_id, type(exc).__name__)
        log.debug("why the chunk's reports were not published", exc_info=True)  # DEBUG: may name files
        return
    log.info("job %d: %d reports published, %d failed", job_id, summary.published, summary.failed)


def _score_isolated(chunk: _Chunk, todo: list[str], redelivered: bool, score: Any) -> None:
    """Score one image at a time, counting each attempt first.

    Only a redelivery (its worker died) fails an image out of attempts as ``crashed_worker`` here; a chunk
    re-sent by ``_give_back`` scores its images and lets the give-back decide with the right reason.
    """
    chunk.summary["isolated"] = True
    job_id = chunk.message.job_id
    log.warning(
        "job %d: chunk redelivered after a worker died, or re-sent after an unfinished delivery; "
        "scoring its %d unfinished images one at a time",
        job_id,
        len(todo),
    )
    max_attempts = chunk.settings.max_attempts
    for uri in todo:
        # Counted before scoring, so an image that kills the worker accumulates attempts.
        attempts = record_attempts(chunk.engine, job_id, [uri]).get(uri, 0)
        chunk.counted.add(uri)
        if redelivered and attempts >= max_attempts:
            log.error(
                "job %d: an image killed its worker %d times; failing it as crashed_worker", job_id, attempts
            )
            detail = f"its chunk killed the worker {attempts} times (DEEPCOVID_MAX_ATTEMPTS={max_attempts})"
            chunk.fail([uri], "crashed_worker", detail)
            continue
        score([uri])


def _give_back(
    chunk: _Chunk, todo: list[str], reason: str, resend: Callable[[ChunkMessage, list[str]], None] | None
) -> None:
    """Count an attempt for each unfinished image, fail those out of attempts, re-send the rest halved.

    Runs before the task returns (and so before the message is acknowledged); if anything here fails,
    the message is rejected with requeue and comes back whole.
    """
    job_id = chunk.message.job_id
    unfinished = [u for u in todo if u not in chunk.finished]
    try:
        uncounted = [u for u in unfinished if u not in chunk.counted]
        attempts = record_attempts(chunk.engine, job_id, uncounted) if uncounted else {}
        if chunk.counted:  # already counted when scored one at a time: read, not counted again
            counted = chunk_state(chunk.engine, job_id, [u for u in unfinished if u in chunk.counted])
            attempts.update({uri: count for uri, (_finished, count) in counted.items()})
        spent = [u for u in unfinished if attempts.get(u, 0) >= chunk.settings.max_attempts]
        out_of_attempts = frozenset(spent)
        again = [u for u in unfinished if u not in out_of_attempts]
        if spent:
            detail = f"{REASONS[reason]} ({chunk.settings.max_attempts} attempts, DEEPCOVID_MAX_ATTEMPTS)"
            chunk.fail(spent, reason, detail)
        half = (len(again) + 1) // 2
        parts = [part for part in (again[:half], again[half:]) if part]
        for part in parts:
            (resend or _resend_through_broker)(chunk.message, part)
    except Exception as exc:
        log.error(
            "job %d: could not record or re-send the chunk's unfinished images (%s); requeueing the chunk",
            job_id,
            type(exc).__name__,
        )
        raise Reject(f"could not re-send: {type(exc).__name__}", requeue=True) from None
    chunk.summary["resent"] = len(again)
    log.warning(
        "job %d: %d images finished, %d re-sent in %d smaller chunks, %d failed as %s",
        job_id,
        len(chunk.finished) - len(spent),
        len(again),
        len(parts),
        len(spent),
        reason,
    )


def _resend_through_broker(message: ChunkMessage, uris: list[str]) -> None:
    send_chunk(app, message.job_id, message.bundle_id, uris)


@app.task(bind=True, name=TASK_NAME, max_retries=None)
def score_chunk(
    self: Any, job_id: Any = None, bundle_id: Any = None, uris: Any = None, **unknown: Any
) -> dict[str, Any]:
    """Score one chunk of image URIs with bundle ``bundle_id`` and record the results for job ``job_id``."""
    settings = get_settings()
    delivery_info = self.request.delivery_info or {}
    try:
        if unknown:
            raise InvalidMessage(f"{len(unknown)} unexpected arguments")
        message = parse_message(job_id, bundle_id, uris, settings)
        check_job(_engine_for(settings), message)
        return run_chunk(
            message.job_id,
            message.bundle_id,
            message.uris,
            settings=settings,
            redelivered=bool(delivery_info.get("redelivered")),
        )
    except InvalidMessage as exc:
        log.error("rejected task %s: %s (not retried, nothing written)", self.request.id, exc)
        raise Reject(f"invalid message: {exc}", requeue=False) from None
    except retryable_errors() as exc:
        retries = self.request.retries
        countdown = min(2**retries, settings.retry_backoff_max)
        level = logging.ERROR if retries >= MAX_RETRIES else logging.WARNING
        log.log(level, "job %s: %s (%s); retrying the chunk in %ds (retry %d)", _job(job_id),
                type(exc).__name__, _short(exc), countdown, retries + 1)  # fmt: skip
        try:
            # The reprs again: a retry is a new send, and Celery would otherwise show the raw URIs.
            # exc: operators see why in Flower; engines hide SQL parameters and drivers' detail lines.
            retry = self.retry(
                exc=exc, countdown=countdown, throw=False, **chunk_reprs(job_id, bundle_id, uris)
            )
        except Exception as send_error:  # the broker refused the retry: keep the message instead
            log.error(
                "job %s: the retry could not be sent (%s); requeueing",
                _job(job_id),
                type(send_error).__name__,
            )
            raise Reject("retry not sent", requeue=True) from None
        raise retry from None


def _job(job_id: Any) -> str:
    """A job id fit for a log line, whatever the message carried."""
    return str(job_id)[:40]


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, bounded: enough to act on, no tracebacks."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:300]
