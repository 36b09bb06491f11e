"""``deepcovid screen``: the whole pipeline in one process, with no broker and no database server.

It runs exactly the code the distributed system runs: ``producer.listing`` to list,
``db.writes.register_images`` to register, ``deepcovid.pipeline.score_chunk`` to score and
``db.writes.write_results`` to store, so results are interchangeable with a worker's.
"""

from __future__ import annotations

import heapq
import json
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from db.jobs import create_job, finish_job_if_done
from db.registry import UnknownBundle, active_bundle, get_bundle, register_bundle, set_active
from db.schema import open_database
from db.writes import register_images, write_results
from deepcovid.bundle import Bundle, BundleError, find_bundle, install_bundle, load_bundle
from deepcovid.chunking import batched
from deepcovid.defaults import REGISTER_BATCH, TOP_FLAGGED
from deepcovid.ensemble import Ensemble
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.pipeline import score_chunk
from deepcovid.results import ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.storage import open_storage
from deepcovid.untrained import is_untrained
from producer.listing import Include, first_batch, list_source, parse_include
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
    flagged: int = 0
    top_flagged: list[tuple[float, str]] = field(default_factory=list)  # (ensemble score, uri), highest first
    interrupted: bool = False
    promoted: bool = False  # the --bundle given became the active bundle (there was none)
    untrained: bool = False  # the bundle is one `bundle init` made: its scores mean nothing
    unreadable: list[str] = field(default_factory=list)
    not_listed: Counter[str] = field(default_factory=Counter)  # files left out, by extension

    @property
    def done(self) -> int:
        return self.scored + sum(self.failed.values())

    def highest_flagged(self) -> list[tuple[float, str]]:
        """The highest-scoring flagged images of this run, highest first."""
        return sorted(self.top_flagged, reverse=True)


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
    source: str,
    *,
    settings: Settings | None = None,
    bundle: str | None = None,
    include: Include | str | None = None,
    rescore: bool = False,
    limit: int | None = None,
    on_listed: Callable[[ScreenSummary], None] | None = None,
    on_start: Callable[[ScreenSummary], None] | None = None,
    on_images: Callable[[int], None] | None = None,
    on_chunk: Callable[[ScreenSummary], None] | None = None,
) -> ScreenSummary:
    """List, register, score and store ``source`` in this process; returns the run's summary.

    Every chunk's results are committed before the next chunk starts, so an interruption loses at most
    the chunk in flight; running again resumes (images scored by the bundle are skipped). On Ctrl-C the
    summary comes back with ``interrupted=True``. ``on_images(n)`` reports progress after every batch.
    """
    settings = settings or get_settings()
    if not isinstance(include, Include):
        include = parse_include(include)
    # A local directory screened here is readable by this process whatever the storage roots say.
    canonical = check_source(source, settings, extra_roots=[Path(source).expanduser()])
    local = Path(canonical)
    extra_roots = () if canonical.startswith("s3://") else (local if local.is_dir() else local.parent,)

    engine = open_database(settings, create=True)
    loaded, promoted = resolve_bundle(engine, settings, bundle)
    bundle_id = loaded.bundle_id
    options: dict[str, Any] = {"include": include.describe(), "rescore": rescore, "embedded": True}
    if limit:
        options["limit"] = limit
    untrained = is_untrained(loaded.manifest)
    if untrained:
        options["untrained"] = True  # `jobs` and `status` mark the job: its scores are meaningless
    summary = ScreenSummary(
        job_id=0,
        bundle_id=bundle_id,
        database_url=settings.effective_database_url,
        promoted=promoted,
        untrained=untrained,
    )

    def unreadable(path: str, exc: OSError) -> None:
        summary.unreadable.append(path)

    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        refs = list_source(
            canonical, include, settings=settings, on_error=unreadable, not_listed=summary.not_listed
        )
        if limit:
            refs = islice(refs, limit)
        batches = first_batch(batched(refs, REGISTER_BATCH), source, summary.not_listed)
        job_id = summary.job_id = create_job(engine, source=canonical, bundle_id=bundle_id, options=options)
        for batch in batches:
            summary.listed += len(batch)
            uris = register_images(engine, job_id, bundle_id, batch, rescore=rescore)
            summary.to_score += len(uris)
            _spool(uris, spool)
            if on_listed is not None:
                on_listed(summary)
        summary.skipped = summary.listed - summary.to_score

        storage = open_storage(settings, extra_roots=extra_roots)
        ensemble = Ensemble.from_bundle(loaded, device=settings.device, settings=settings)
        summary.device = ensemble.label
        if on_start is not None:
            on_start(summary)
        host = socket.gethostname()
        try:
            for chunk in _read_spool(spool, settings.chunk_size):
                results = score_chunk(
                    chunk, storage=storage, ensemble=ensemble, settings=settings, on_batch=on_images
                )
                write_results(
                    engine,
                    job_id=job_id,
                    bundle_id=bundle_id,
                    results=results,
                    worker_host=host,
                    device=summary.device,
                )
                _tally(summary, results)
                if on_chunk is not None:
                    on_chunk(summary)
        except KeyboardInterrupt:
            summary.interrupted = True
    finish_job_if_done(engine, job_id)
    return summary


def _tally(summary: ScreenSummary, results: list[ImageResult]) -> None:
    for result in results:
        if result.scored:
            summary.scored += 1
            if result.ensemble_decision:
                summary.flagged += 1
                item = (float(result.ensemble_score or 0.0), result.uri)
                if len(summary.top_flagged) < TOP_FLAGGED:
                    heapq.heappush(summary.top_flagged, item)
                else:
                    heapq.heappushpop(summary.top_flagged, item)
        else:
            summary.failed[result.reason or "internal_error"] += 1
