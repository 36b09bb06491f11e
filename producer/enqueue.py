"""Turn an archive into a scan job: pre-flight checks, then list -> register -> send chunks to the broker.

Resumable and idempotent: registration skips images the bundle has already scored (unless ``rescore``),
so an interrupted or repeated enqueue is simply run again.

Exit codes of ``deepcovid enqueue`` (and ``deepcovid screen`` where they apply):

====  ==============================================================================
code  meaning
====  ==============================================================================
0     jobs queued, or nothing to do (every image already scored by the bundle)
2     bad command-line usage
3     database schema not current: run ``deepcovid db upgrade``
10    the source path does not exist
11    the source path cannot be read (permission denied, or not a directory)
12    the S3 bucket does not exist
13    the S3 bucket denies access to these credentials
14    the Celery broker cannot be reached
15    the database cannot be reached
16    no bundle to score with (none active, or the given id is not registered)
17    the local source is not under the configured storage roots (or none are configured)
18    the S3 endpoint cannot be reached
130   interrupted (Ctrl-C); what was written stays, re-run to resume
====  ==============================================================================
"""

from __future__ import annotations

import os
import queue
import stat as stat_module
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from producer.listing import Include, list_source, parse_include, parse_s3_source

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine

    from deepcovid.settings import Settings

EXIT_OK = 0
EXIT_SCHEMA_NOT_CURRENT = 3
EXIT_MISSING_PATH = 10
EXIT_UNREADABLE_PATH = 11
EXIT_NO_SUCH_BUCKET = 12
EXIT_BUCKET_ACCESS_DENIED = 13
EXIT_BROKER_UNREACHABLE = 14
EXIT_DATABASE_UNREACHABLE = 15
EXIT_NO_BUNDLE = 16
EXIT_OUTSIDE_STORAGE_ROOTS = 17
EXIT_S3_UNREACHABLE = 18
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "queued, or nothing to do",
    EXIT_SCHEMA_NOT_CURRENT: "database schema not current (run `deepcovid db upgrade`)",
    EXIT_MISSING_PATH: "source path does not exist",
    EXIT_UNREADABLE_PATH: "source path cannot be read",
    EXIT_NO_SUCH_BUCKET: "S3 bucket does not exist",
    EXIT_BUCKET_ACCESS_DENIED: "S3 bucket denies access",
    EXIT_BROKER_UNREACHABLE: "broker unreachable",
    EXIT_DATABASE_UNREACHABLE: "database unreachable",
    EXIT_NO_BUNDLE: "no bundle to score with",
    EXIT_OUTSIDE_STORAGE_ROOTS: "source outside the storage roots",
    EXIT_S3_UNREACHABLE: "S3 endpoint unreachable",
    EXIT_INTERRUPTED: "interrupted; re-run to resume",
}

REGISTER_BATCH = 5000  # listing entries registered per database round trip

NO_BUNDLE_HELP = (
    "no active bundle is registered. Register and promote one with "
    "`deepcovid bundle register BUNDLE_DIR --promote` (or `deepcovid bundle promote ID`); "
    "make one with `deepcovid train` or `deepcovid bundle init`."
)


class PreflightError(Exception):
    """A problem found before any work starts: a message for the user and a distinct exit code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass
class EnqueueSummary:
    """What one enqueue did; ``skipped`` images were already scored by the bundle."""

    job_id: int
    listed: int = 0
    queued: int = 0
    skipped: int = 0
    chunks: int = 0
    bundle_id: str = ""
    unreadable: list[str] = field(default_factory=list)  # subdirectories the walk could not read


T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), without materialising the input."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


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


# ----------------------------------------------------------------------------------------------------------
# Pre-flight checks


def check_local_source(source: str, settings: Settings, extra_roots: Iterable[Path] = ()) -> Path:
    """The absolute, resolved directory to list, or a PreflightError saying why it cannot be used."""
    path = Path(source).expanduser()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PreflightError(EXIT_MISSING_PATH, f"{source}: no such file or directory") from None
    except (PermissionError, NotADirectoryError) as exc:
        raise PreflightError(EXIT_UNREADABLE_PATH, f"{source}: cannot be read ({exc.strerror})") from None
    if not stat_module.S_ISDIR(st.st_mode):
        raise PreflightError(EXIT_UNREADABLE_PATH, f"{source}: is not a directory")
    try:
        with os.scandir(path) as it:
            next(it, None)
    except OSError as exc:
        raise PreflightError(EXIT_UNREADABLE_PATH, f"{source}: cannot be read ({exc.strerror})") from None
    resolved = path.resolve()
    roots = [Path(r).expanduser().resolve() for r in [*settings.storage_roots, *extra_roots]]
    if not roots:
        raise PreflightError(
            EXIT_OUTSIDE_STORAGE_ROOTS,
            "no storage roots are configured, so workers would refuse every file. "
            f"Set DEEPCOVID_STORAGE_ROOTS to a comma-separated list of directories including {resolved}.",
        )
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        listed = ", ".join(str(r) for r in roots)
        raise PreflightError(
            EXIT_OUTSIDE_STORAGE_ROOTS,
            f"{resolved} is not under the storage roots ({listed}); workers would refuse its files. "
            "Add it to DEEPCOVID_STORAGE_ROOTS (on the workers too).",
        )
    return resolved


def check_s3_source(source: str, settings: Settings, client: Any = None) -> tuple[str, str]:
    """(bucket, prefix) once the bucket is known to exist and to let these credentials in."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    from deepcovid.storage import s3_client

    try:
        bucket, prefix = parse_s3_source(source)
    except ValueError as exc:
        raise PreflightError(EXIT_MISSING_PATH, str(exc)) from None
    if client is None:
        client = s3_client(settings)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
            raise PreflightError(EXIT_NO_SUCH_BUCKET, f"S3 bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            raise PreflightError(
                EXIT_BUCKET_ACCESS_DENIED,
                f"S3 bucket {bucket!r} denies access with these credentials "
                "(check DEEPCOVID_S3_ACCESS_KEY_ID / DEEPCOVID_S3_SECRET_ACCESS_KEY and the bucket policy)",
            ) from None
        raise PreflightError(EXIT_S3_UNREACHABLE, f"S3 bucket {bucket!r}: {code or exc}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise PreflightError(
            EXIT_BUCKET_ACCESS_DENIED,
            "no S3 credentials: set DEEPCOVID_S3_ACCESS_KEY_ID / DEEPCOVID_S3_SECRET_ACCESS_KEY or AWS_*",
        ) from None
    except EndpointConnectionError as exc:
        raise PreflightError(
            EXIT_S3_UNREACHABLE, f"cannot reach S3 at {exc.kwargs.get('endpoint_url')}"
        ) from None
    except BotoCoreError as exc:
        raise PreflightError(EXIT_S3_UNREACHABLE, f"cannot reach S3: {exc}") from None
    return bucket, prefix


def check_database(settings: Settings) -> Engine:
    """An engine on a reachable database whose schema is at the latest migration."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError, OperationalError

    from db.engine import make_engine
    from db.schema import SchemaNotCurrent, ensure_schema_current
    from deepcovid.settings import mask_url

    url = settings.effective_database_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise PreflightError(
            EXIT_DATABASE_UNREACHABLE, f"cannot reach the database {mask_url(url)}: {reason}"
        ) from None
    try:
        ensure_schema_current(engine)
    except SchemaNotCurrent as exc:
        raise PreflightError(EXIT_SCHEMA_NOT_CURRENT, str(exc)) from None
    return engine


def resolve_bundle_id(engine: Engine, bundle_id: str | None) -> str:
    """The given registered bundle id, or the active one."""
    from db.registry import UnknownBundle, active_bundle, get_bundle

    if bundle_id:
        try:
            get_bundle(engine, bundle_id)
        except UnknownBundle:
            raise PreflightError(
                EXIT_NO_BUNDLE,
                f"bundle {bundle_id!r} is not registered; "
                "register it with `deepcovid bundle register BUNDLE_DIR`",
            ) from None
        return bundle_id
    record = active_bundle(engine)
    if record is None:
        raise PreflightError(EXIT_NO_BUNDLE, NO_BUNDLE_HELP)
    return record.bundle_id


def check_broker(app: Celery, timeout: float = 5.0) -> None:
    """Fail fast (seconds, not Celery's minutes of retries) when the broker is down."""
    from deepcovid.settings import mask_url

    url = mask_url(app.conf.broker_url or "")
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=timeout)
    except Exception as exc:  # kombu raises library-specific OperationalError subclasses
        raise PreflightError(EXIT_BROKER_UNREACHABLE, f"cannot reach the broker {url}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Enqueue


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

    Raises PreflightError (with its exit code) before any job is created when something is missing.
    """
    from db.jobs import create_job, finish_job_if_done
    from db.writes import register_images
    from deepcovid.queue import make_celery, send_chunk
    from deepcovid.settings import get_settings

    settings = settings or get_settings()
    chunk_size = chunk_size or settings.chunk_size
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if not isinstance(include, Include):
        include = parse_include(include)

    if source.startswith("s3://"):
        check_s3_source(source, settings)
        canonical = source
    else:
        canonical = str(check_local_source(source, settings))
    engine = check_database(settings)
    bundle_id = resolve_bundle_id(engine, bundle_id)
    app = app or make_celery(settings)
    check_broker(app)

    options = {"chunk_size": chunk_size, "include": include.describe(), "rescore": rescore}
    job_id = create_job(engine, source=canonical, bundle_id=bundle_id, options=options)
    summary = EnqueueSummary(job_id=job_id, bundle_id=bundle_id)

    def unreadable(path: str, exc: OSError) -> None:
        summary.unreadable.append(path)

    pending: list[str] = []
    refs = list_source(canonical, include, settings=settings, on_error=unreadable)
    for batch in prefetch(batched(refs, REGISTER_BATCH)):
        summary.listed += len(batch)
        pending.extend(register_images(engine, job_id, bundle_id, batch, rescore=rescore))
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
    if summary.queued == 0:
        finish_job_if_done(engine, job_id)  # nothing will ever arrive to finish it
    if on_progress is not None:
        on_progress(summary)
    return summary
