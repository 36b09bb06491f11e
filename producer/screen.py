"""``deepcovid screen``: the whole pipeline in one process, with no broker and no database server.

It runs exactly the code the distributed system runs: ``producer.listing`` to list,
``db.writes.register_images`` to register, ``deepcovid.pipeline.score_chunk`` to score and
``db.writes.write_results`` to store, so results are interchangeable with a worker's.
"""

from __future__ import annotations

import json
import signal
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from db.jobs import (
    can_resume,
    create_job,
    find_resumable,
    finish_job_if_done,
    get_job,
    resume_job,
    stop_job,
    this_runner,
)
from db.queries import flagged_images, job_progress
from db.registry import UnknownBundle, active_bundle, get_bundle, register_bundle, set_active
from db.schema import open_database
from db.writes import register_images, write_results
from deepcovid.artifacts import open_artifacts
from deepcovid.bundle import Bundle, BundleError, find_bundle, install_bundle, load_bundle
from deepcovid.chunking import batched
from deepcovid.defaults import REGISTER_BATCH, TOP_FLAGGED
from deepcovid.dicomweb import is_dicomweb
from deepcovid.ensemble import Ensemble
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.pipeline import score_chunk
from deepcovid.results import ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.status import JobStatus
from deepcovid.storage import Storage, open_storage
from deepcovid.untrained import is_untrained
from producer.listing import Include, first_batch, list_source, parse_include, registered
from producer.preflight import NO_BUNDLE_HELP, check_source

SCREEN_NO_BUNDLE_HELP = (
    "no bundle to score with. Pass --bundle BUNDLE_DIR (a bundle made by `deepcovid train` or "
    "`deepcovid bundle init`), or register and promote one: " + NO_BUNDLE_HELP.split(". ", 1)[1]
)


@dataclass
class ScreenSummary:
    """What one ``screen`` run did, for the closing report."""

    job_id: int
    bundle_id: str
    database_url: str
    device: str = ""
    listed: int = 0
    to_score: int = 0
    skipped: int = 0  # already scored by this bundle
    scored: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    flagged_now: int = 0  # flagged among the images scored by this run
    # The job's flagged images, reused ones included (what `jobs` counts), read back when the run ends.
    flagged: int = 0
    top_flagged: list[tuple[float, str]] = field(default_factory=list)  # (ensemble score, uri), highest first
    interrupted: bool = False
    resumed: bool = False  # it continued an interrupted job rather than starting one
    promoted: bool = False  # the --bundle given became the active bundle (there was none)
    untrained: bool = False  # the bundle is one `bundle init` made: its scores mean nothing
    unreadable: list[str] = field(default_factory=list)
    heatmaps: int = 0  # Grad-CAM maps stored by this run
    heatmap_errors: Counter[str] = field(default_factory=Counter)  # why maps were not stored -> count
    artifacts: str = ""  # where the maps are (DEEPCOVID_ARTIFACTS or the data directory's store)
    not_listed: Counter[str] = field(default_factory=Counter)  # files left out, by extension

    @property
    def done(self) -> int:
        return self.scored + sum(self.failed.values())

    def highest_flagged(self) -> list[tuple[float, str]]:
        """The job's highest-scoring flagged images, highest first (as ``results --flagged`` lists them)."""
        return list(self.top_flagged)


# ----------------------------------------------------------------------------------------------------------
# The bundle


def resolve_bundle(engine: Engine, settings: Settings, bundle: str | None) -> tuple[Bundle, bool]:
    """The ``deepcovid.bundle.Bundle`` to score with, and whether it was just promoted.

    ``bundle`` is a bundle directory (verified, installed, registered, and promoted when no bundle is
    active yet, so the next run needs no flag), a registered bundle id, or None for the active bundle.
    """
    bundles_dir = settings.effective_bundles_dir
    if bundle and Path(bundle).expanduser().is_dir():
        try:
            loaded = load_bundle(install_bundle(Path(bundle).expanduser(), bundles_dir))
        except BundleError as exc:
            raise UserError(ExitCode.NO_BUNDLE, f"{bundle}: not a usable bundle: {exc}") from None
        register_bundle(
            engine,
            bundle_id=loaded.bundle_id,
            manifest=loaded.manifest,
            path=str(loaded.path),
            metrics=loaded.metrics or None,
        )
        if active_bundle(engine) is None:
            set_active(engine, loaded.bundle_id)
            return loaded, True
        return loaded, False
    if bundle:
        try:
            record = get_bundle(engine, bundle)
        except UnknownBundle:
            raise UserError(
                ExitCode.NO_BUNDLE,
                f"{bundle!r} is neither a bundle directory nor a registered bundle id. "
                + SCREEN_NO_BUNDLE_HELP,
            ) from None
    else:
        record = active_bundle(engine)
        if record is None:
            raise UserError(ExitCode.NO_BUNDLE, SCREEN_NO_BUNDLE_HELP)
    try:
        return find_bundle(record.bundle_id, bundles_dir), False
    except BundleError as exc:
        if record.path and Path(record.path).is_dir():
            try:
                return load_bundle(record.path), False
            except BundleError:
                pass
        raise UserError(
            ExitCode.NO_BUNDLE,
            f"bundle {record.bundle_id} is registered but not usable from {bundles_dir} ({exc}); "
            "pass --bundle BUNDLE_DIR",
        ) from None


# ----------------------------------------------------------------------------------------------------------
# The run


def _spool(uris: list[str], fh: Any) -> None:
    for uri in uris:
        fh.write(json.dumps(uri) + "\n")


def _read_spool(fh: Any, size: int) -> Iterator[list[str]]:
    fh.seek(0)
    lines = (json.loads(line) for line in fh)
    while chunk := list(islice(lines, size)):
        yield chunk


def screen(
    source: str | None,
    *,
    settings: Settings | None = None,
    bundle: str | None = None,
    include: Include | str | None = None,
    rescore: bool = False,
    limit: int | None = None,
    resume: int | None = None,
    on_listed: Callable[[ScreenSummary], None] | None = None,
    on_start: Callable[[ScreenSummary], None] | None = None,
    on_images: Callable[[int], None] | None = None,
    on_chunk: Callable[[ScreenSummary], None] | None = None,
) -> ScreenSummary:
    """List, register, score and store ``source`` in this process; returns the run's summary.

    Every chunk's results are committed before the next chunk starts, so an interruption loses at most
    the chunk in flight. Ctrl-C or SIGTERM leaves the job ``interrupted`` (the summary says so); running
    the same command again, or ``resume`` with the job id, continues that job. Any other error leaves it
    ``failed`` with the reason. ``on_images(n)`` reports progress after every batch.
    """
    settings = settings or get_settings()
    engine = open_database(settings, create=True)
    if resume is not None:
        source, bundle, include, rescore, limit = _resumed(engine, resume, source)
    assert source is not None
    if not isinstance(include, Include):
        include = parse_include(include)
    if is_dicomweb(source):
        # A PACS screened here is readable by this process whatever DEEPCOVID_DICOMWEB_ALLOW says.
        root = source.partition("?")[0]
        settings = settings.model_copy(update={"dicomweb_allow": [*settings.dicomweb_allow, root]})
    # A local directory screened here is readable by this process whatever the storage roots say.
    canonical = check_source(source, settings, extra_roots=[Path(source).expanduser()])
    local = Path(canonical)
    remote = canonical.startswith("s3://") or is_dicomweb(canonical)
    extra_roots = () if remote else (local if local.is_dir() else local.parent,)

    # Before any job exists: an artifact store inside the archive is refused with one line.
    artifacts = open_artifacts(settings, extra_roots=extra_roots)
    loaded, promoted = resolve_bundle(engine, settings, bundle)
    bundle_id = loaded.bundle_id
    options: dict[str, Any] = {"include": include.describe(), "rescore": rescore, "embedded": True}
    if limit:
        options["limit"] = limit
    untrained = is_untrained(loaded.manifest)
    if untrained:
        options["untrained"] = True  # `jobs` and `status` mark the job: its scores are meaningless
    # Before any job exists: a device that cannot be used (or a bundle that does not load) changes nothing.
    ensemble = Ensemble.from_bundle(loaded, device=settings.device, settings=settings)
    summary = ScreenSummary(
        job_id=0,
        bundle_id=bundle_id,
        database_url=settings.effective_database_url,
        promoted=promoted,
        device=ensemble.label,
        untrained=untrained,
        artifacts=artifacts.describe(),
    )

    def unreadable(path: str, exc: OSError) -> None:
        summary.unreadable.append(path)

    listing = refs = list_source(
        canonical, include, settings=settings, on_error=unreadable, not_listed=summary.not_listed
    )
    if limit:
        refs = islice(refs, limit)
    batches = first_batch(batched(refs, REGISTER_BATCH), source, summary.not_listed)
    runner = this_runner()
    job_id = resume or find_resumable(engine, source=canonical, bundle_id=bundle_id, options=options)
    if job_id is not None:
        resume_job(engine, job_id, runner)
        summary.resumed = True
    else:
        job_id = create_job(engine, source=canonical, bundle_id=bundle_id, options=options, runner=runner)
    summary.job_id = job_id
    storage = open_storage(settings, extra_roots=extra_roots)
    try:
        with _sigterm_interrupts(), tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
            _register(engine, summary, batches, spool, rescore=rescore, on_listed=on_listed, listing=listing)
            if on_start is not None:
                on_start(summary)
            for chunk in _read_spool(spool, settings.chunk_size):
                results = score_chunk(
                    chunk,
                    storage=storage,
                    ensemble=ensemble,
                    settings=settings,
                    on_batch=on_images,
                    artifacts=artifacts,
                )
                write_results(
                    engine,
                    job_id=job_id,
                    bundle_id=bundle_id,
                    results=results,
                    worker_host=socket.gethostname(),
                    device=summary.device,
                )
                _tally(summary, results)
                if settings.publish_to:
                    _publish(engine, job_id, chunk, settings, storage)
                if on_chunk is not None:
                    on_chunk(summary)
    except KeyboardInterrupt:
        summary.interrupted = True
        stop_job(engine, job_id, JobStatus.interrupted, f"interrupted; {resume_hint(job_id)}")
    except BaseException as exc:
        stop_job(engine, job_id, JobStatus.failed, _why(exc))
        raise
    else:
        finish_job_if_done(engine, job_id)
    _read_flagged(engine, summary)
    return summary


def _publish(engine: Engine, job_id: int, uris: list[str], settings: Settings, storage: Storage) -> None:
    """DEEPCOVID_PUBLISH_TO: the chunk's reports go to the PACS now; failures are recorded per image and
    never stop the screening (`deepcovid publish JOB` sends them again)."""
    from pacs.publish import Publisher, publish_job  # highdicom: only where publishing is configured

    publish_job(
        engine, job_id, settings.publish_to or "", settings, uris=uris, publisher=Publisher(settings, storage)
    )


def resume_hint(job_id: int) -> str:
    """How to continue an interrupted job."""
    return f"resume with: deepcovid screen --resume {job_id} (or run the same command again)"


def _resumed(engine: Engine, job_id: int, source: str | None) -> tuple[str, str, str, bool, int | None]:
    """The source, bundle and options of the job ``--resume`` names; refuses one that cannot be resumed."""
    job = get_job(engine, job_id)
    if job is None:
        raise UserError(ExitCode.FAILURES, f"no job {job_id} (see `deepcovid jobs`)")
    if not (job.options or {}).get("embedded"):
        raise UserError(
            ExitCode.USAGE,
            f"job {job_id} is run by workers, not by screen; re-send its images with: "
            f"deepcovid requeue {job_id} --queued",
        )
    if not can_resume(job):
        raise UserError(
            ExitCode.USAGE,
            f"job {job_id} is {JobStatus(job.state).value}; only an interrupted job can be resumed",
        )
    if source is not None and Path(source).expanduser().resolve() != Path(job.source):
        raise UserError(
            ExitCode.USAGE, f"job {job_id} screened another source; leave SOURCE out with --resume"
        )
    options = job.options or {}
    return (
        job.source,
        job.bundle_id,
        options.get("include"),
        bool(options.get("rescore")),
        options.get("limit"),
    )


def _register(
    engine: Engine,
    summary: ScreenSummary,
    batches: Iterator[list[Any]],
    spool: Any,
    *,
    rescore: bool,
    on_listed: Callable[[ScreenSummary], None] | None,
    listing: Any = None,
) -> None:
    """Make the listed images members of the job; those to score go to the spool file."""
    for batch in batches:
        summary.listed += len(batch)
        uris = register_images(engine, summary.job_id, summary.bundle_id, batch, rescore=rescore)
        summary.to_score += len(uris)
        _spool(uris, spool)
        registered(listing, summary.listed)
        if on_listed is not None:
            on_listed(summary)
    summary.skipped = summary.listed - summary.to_score


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a service stop, ``kill``) ends the run as Ctrl-C does: the job is left resumable."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _why(exc: BaseException) -> str:
    """A failed job's reason: a UserError's own line; otherwise only the error's type, since an
    unexpected message may quote a file name."""
    if isinstance(exc, UserError):
        return str(exc)
    return f"the run stopped on an unexpected {type(exc).__name__}; run the same command again"


def _read_flagged(engine: Engine, summary: ScreenSummary) -> None:
    """The job's flagged count and top flagged as the database has them, so the summary says what
    ``jobs`` and ``results --flagged`` say, images reused from an earlier run included."""
    summary.flagged = job_progress(engine, summary.job_id).flagged
    summary.top_flagged = [
        (float(image.ensemble_score or 0.0), image.uri)
        for image in flagged_images(engine, summary.job_id, limit=TOP_FLAGGED)
    ]


def _tally(summary: ScreenSummary, results: list[ImageResult]) -> None:
    for result in results:
        if result.heatmap is not None:
            if result.heatmap.key is not None:
                summary.heatmaps += 1
            else:
                summary.heatmap_errors[result.heatmap.error or "unknown"] += 1
        if result.scored:
            summary.scored += 1
            if result.ensemble_decision:
                summary.flagged_now += 1
        else:
            summary.failed[result.reason or "internal_error"] += 1
