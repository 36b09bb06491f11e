"""Turn an archive into a scan job: pre-flight checks, then list -> register -> send chunks to the broker.

Resumable and idempotent: registration skips images the bundle has already scored (unless ``rescore``),
so an interrupted or repeated enqueue is simply run again. Its exit codes are ``deepcovid.exitcodes``'.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery import Celery

from db.jobs import create_job, finish_job_if_done
from db.registry import get_bundle
from db.schema import open_database
from db.writes import register_images
from deepcovid.chunking import batched
from deepcovid.defaults import REGISTER_BATCH
from deepcovid.queue import make_celery, send_chunk
from deepcovid.settings import Settings, get_settings
from deepcovid.untrained import is_untrained
from producer.listing import Include, first_batch, list_source, parse_include, registered
from producer.preflight import check_broker, check_source, resolve_bundle_id


@dataclass
class EnqueueSummary:
    """What one enqueue did; ``skipped`` images were already scored by the bundle."""

    job_id: int
    listed: int = 0
    queued: int = 0
    skipped: int = 0
    chunks: int = 0
    bundle_id: str = ""
    untrained: bool = False  # the bundle is one `bundle init` made: its scores mean nothing
    unreadable: list[str] = field(default_factory=list)  # subdirectories the walk could not read
    not_listed: Counter[str] = field(default_factory=Counter)  # files left out, by extension


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a thread produces the next ones, at most ``depth`` ahead.

    Listing (CPU and file-system calls) then overlaps the database round trips of registration; the
    bound keeps memory constant. An exception in the producer is raised here; leaving early stops it.
    """
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, name="deepcovid-listing", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def enqueue(
    source: str,
    *,
    settings: Settings | None = None,
    bundle_id: str | None = None,
    chunk_size: int | None = None,
    include: Include | str | None = None,
    rescore: bool = False,
    app: Celery | None = None,
    on_progress: Callable[[EnqueueSummary], None] | None = None,
) -> EnqueueSummary:
    """Check everything, create a job, then stream listing -> ``register_images`` -> ``send_chunk``.

    Raises UserError (with its exit code) before any job is created when something is missing.
    """
    settings = settings or get_settings()
    chunk_size = chunk_size or settings.chunk_size
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if not isinstance(include, Include):
        include = parse_include(include)

    canonical = check_source(source, settings)
    engine = open_database(settings, write=True)
    bundle_id = resolve_bundle_id(engine, bundle_id)
    app = app or make_celery(settings)
    check_broker(app)

    summary = EnqueueSummary(
        job_id=0, bundle_id=bundle_id, untrained=is_untrained(get_bundle(engine, bundle_id).manifest)
    )

    def unreadable(path: str, exc: OSError) -> None:
        summary.unreadable.append(path)

    pending: list[str] = []
    refs = list_source(
        canonical, include, settings=settings, on_error=unreadable, not_listed=summary.not_listed
    )
    batches = first_batch(prefetch(batched(refs, REGISTER_BATCH)), source, summary.not_listed)
    options: dict[str, Any] = {"chunk_size": chunk_size, "include": include.describe(), "rescore": rescore}
    if summary.untrained:
        options["untrained"] = True  # `jobs` and `status` mark the job: its scores are meaningless
    job_id = summary.job_id = create_job(engine, source=canonical, bundle_id=bundle_id, options=options)
    for batch in batches:
        summary.listed += len(batch)
        pending.extend(register_images(engine, job_id, bundle_id, batch, rescore=rescore))
        registered(refs, summary.listed)
        while len(pending) >= chunk_size:
            chunk, pending = pending[:chunk_size], pending[chunk_size:]
            send_chunk(app, job_id, bundle_id, chunk)
            summary.queued += len(chunk)
            summary.chunks += 1
        summary.skipped = summary.listed - summary.queued - len(pending)
        if on_progress is not None:
            on_progress(summary)
    if pending:
        send_chunk(app, job_id, bundle_id, pending)
        summary.queued += len(pending)
        summary.chunks += 1
    summary.skipped = summary.listed - summary.queued
    registered(refs, summary.listed)
    if summary.queued == 0:
        finish_job_if_done(engine, job_id)  # nothing will ever arrive to finish it
    if on_progress is not None:
        on_progress(summary)
    return summary
