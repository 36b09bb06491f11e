"""Commands that start a scan: ``enqueue`` (to the workers) and ``screen`` (in this process)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.jobs import database, follow_job
from cli.render import (
    console,
    err_console,
    fail,
    interruptible,
    number,
    rate,
    rows_table,
    score,
    show,
    warning,
)
from deepcovid.errors import TransientError
from deepcovid.exitcodes import ExitCode
from deepcovid.formats import ARCHIVE_SUFFIXES
from deepcovid.settings import get_settings, mask_url
from deepcovid.untrained import untrained_warning

if TYPE_CHECKING:
    from producer.enqueue import EnqueueSummary
    from producer.screen import ScreenSummary

EXIT_CODES = (
    ExitCode.OK,
    ExitCode.FAILURES,
    ExitCode.USAGE,
    ExitCode.SCHEMA_NOT_CURRENT,
    ExitCode.MISSING_PATH,
    ExitCode.UNREADABLE_PATH,
    ExitCode.NO_SUCH_BUCKET,
    ExitCode.BUCKET_ACCESS_DENIED,
    ExitCode.BROKER_UNREACHABLE,
    ExitCode.DATABASE_UNREACHABLE,
    ExitCode.NO_BUNDLE,
    ExitCode.OUTSIDE_STORAGE_ROOTS,
    ExitCode.S3_UNREACHABLE,
    ExitCode.PACS_UNREACHABLE,
    ExitCode.NO_IMAGES,
    ExitCode.DATA_DIR_NOT_WRITABLE,
    ExitCode.INTERRUPTED,
)
"""The exit codes of ``enqueue`` and ``screen``, listed in their ``--help``."""

UNREADABLE_SHOWN = 10
"""Unreadable directories ``enqueue`` names one by one before it only counts the rest."""

DEFAULT_INCLUDE = ",".join(suffix.lstrip(".") for suffix in ARCHIVE_SUFFIXES)

SINCE = typer.Option(
    None, "--since", help="dicomweb:// sources: studies from this date (YYYY-MM-DD), by StudyDate."
)
UNTIL = typer.Option(None, "--until", help="dicomweb:// sources: studies up to this date (YYYY-MM-DD).")
MODALITY = typer.Option(
    None, "--modality", help="dicomweb:// sources: modalities to list, comma separated (default CR,DX)."
)
SOURCE_HELP = (
    "A directory (under DEEPCOVID_STORAGE_ROOTS), s3://bucket/prefix, or a PACS as "
    "dicomweb://host:port/path (dicomwebs:// for HTTPS; other QIDO keys may follow as ?Key=value)."
)


def with_filters(source: str, since: str | None, until: str | None, modality: str | None) -> str:
    """``source`` with the --since/--until/--modality of a dicomweb:// crawl in its query string."""
    if not (since or until or modality):
        return source
    from deepcovid.dicomweb import is_dicomweb

    if not is_dicomweb(source):
        raise fail("--since, --until and --modality filter a dicomweb:// source only", ExitCode.USAGE)
    from pacs.crawl import parse_source  # the PACS role: only for dicomweb:// sources

    try:
        return parse_source(source, since=since or "", until=until or "", modalities=modality or "").source
    except ValueError as exc:
        raise fail(f"bad dicomweb:// source: {exc}", ExitCode.USAGE) from None


ALLOW_UNTRAINED = typer.Option(
    False,
    "--allow-untrained",
    help="No warning for an untrained bundle (from `bundle init`, for pipeline checks); the job still "
    "records that it was untrained.",
)


def enqueue_command(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    chunk_size: Optional[int] = typer.Option(
        None, "--chunk-size", min=1, help="Images per task message (default DEEPCOVID_CHUNK_SIZE)."
    ),
    include: Optional[str] = typer.Option(
        None,
        "--include",
        help=f"Extensions to list ({DEFAULT_INCLUDE} by default, plus files without an extension whose "
        "first bytes are PNG/JPEG/DICOM); add `sniff` to also keep any file whose first bytes are one of "
        "them; `all` lists every file. What is left out is counted by extension in the summary.",
    ),
    rescore: bool = typer.Option(False, "--rescore", help="Score again images the bundle already scored."),
    bundle: Optional[str] = typer.Option(
        None, "--bundle", help="Registered bundle id (default: the active one)."
    ),
    follow: bool = typer.Option(False, "--follow", help="Then show live progress until the job finishes."),
    since: Optional[str] = SINCE,
    until: Optional[str] = UNTIL,
    modality: Optional[str] = MODALITY,
    allow_untrained: bool = ALLOW_UNTRAINED,
) -> None:
    """Queue every image of SOURCE for scoring by the workers, as one job. Re-running resumes."""
    from producer.enqueue import enqueue  # SQLAlchemy and Celery: kept out of CLI start-up
    from producer.listing import describe_not_listed

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    task = progress.add_task("checking", total=None)

    def report(summary: EnqueueSummary) -> None:
        progress.update(
            task,
            description=f"job {summary.job_id}: listed {summary.listed:,}, queued {summary.queued:,}, "
            f"skipped {summary.skipped:,}",
        )

    with (
        progress,
        interruptible("interrupted: what was queued stays queued; run the same command again to resume"),
    ):
        summary = enqueue(
            with_filters(source, since, until, modality),
            bundle_id=bundle,
            chunk_size=chunk_size,
            include=include,
            rescore=rescore,
            on_progress=report,
        )

    if summary.untrained and not allow_untrained:
        warning(untrained_warning(summary.bundle_id))
    for path in summary.unreadable[:UNREADABLE_SHOWN]:
        warning(f"skipped unreadable directory {path}")
    if len(summary.unreadable) > UNREADABLE_SHOWN:
        warning(f"... and {len(summary.unreadable) - UNREADABLE_SHOWN} more unreadable directories")
    if summary.not_listed:
        console.print(describe_not_listed(summary.not_listed), highlight=False)
    if summary.queued == 0:
        console.print(
            f"Nothing to do: all {summary.listed:,} images already scored with bundle {summary.bundle_id} "
            f"(job {summary.job_id}). Use --rescore to score them again.",
            highlight=False,
        )
        return
    console.print(
        f"Job {summary.job_id}: listed {summary.listed:,}, "
        f"queued {summary.queued:,} in {summary.chunks:,} chunks, "
        f"skipped {summary.skipped:,} already scored (bundle {summary.bundle_id}).",
        highlight=False,
    )
    if follow:
        follow_job(database(), summary.job_id)
    else:
        console.print(f"Follow it with: deepcovid status {summary.job_id} --follow", highlight=False)


def screen_command(
    source: Optional[str] = typer.Argument(
        None,
        help="A directory of images, one image, s3://bucket/prefix, or a PACS as dicomweb://host:port/path "
        "(left out with --resume).",
    ),
    bundle: Optional[str] = typer.Option(
        None,
        "--bundle",
        help="A bundle directory (verified, installed, registered) or a registered bundle id.",
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    include: Optional[str] = typer.Option(
        None,
        "--include",
        help="Extensions to list (by default the archive formats, plus extension-less files that are "
        "images), `sniff` to keep any file that is an image, or `all`.",
    ),
    rescore: bool = typer.Option(False, "--rescore", help="Score again images the bundle already scored."),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="Screen only the first N images listed."
    ),
    resume: Optional[int] = typer.Option(
        None,
        "--resume",
        metavar="JOB",
        help="Continue this interrupted job (its source, bundle and options).",
    ),
    allow_failures: bool = typer.Option(
        False,
        "--allow-failures",
        help="Exit 0 even when some images failed (for pipelines that expect some); they are still reported.",
    ),
    since: Optional[str] = SINCE,
    until: Optional[str] = UNTIL,
    modality: Optional[str] = MODALITY,
    allow_untrained: bool = ALLOW_UNTRAINED,
) -> None:
    """Screen SOURCE in this process: no broker, no database server (SQLite in DEEPCOVID_DATA_DIR).

    Same listing, scoring and storage as enqueue + workers. Ctrl-C or SIGTERM keeps what was scored and
    leaves the job interrupted: `--resume JOB`, or the same command again, continues it.
    Exits 1 when some images failed, unless --allow-failures.
    """
    if source is None and resume is None:
        raise fail("say what to screen: deepcovid screen SOURCE (or --resume JOB)", ExitCode.USAGE)
    from producer.screen import screen  # torch: kept out of CLI start-up

    if source is not None:
        source = with_filters(source, since, until, modality)

    updates: dict[str, Any] = {"batch_size": batch_size, "device": device}
    settings = get_settings().model_copy(update={k: v for k, v in updates.items() if v})
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
    )
    task = progress.add_task("listing", total=None, rate="")
    started = [0.0]

    def on_listed(summary: ScreenSummary) -> None:
        progress.start()  # only once listing works (a no-op after the first call)
        progress.update(
            task, description=f"listing ({summary.listed:,} found, {summary.to_score:,} to score)"
        )

    def on_start(summary: ScreenSummary) -> None:
        if summary.untrained and not allow_untrained:
            warning(untrained_warning(summary.bundle_id))
        progress.start()
        started[0] = time.monotonic()
        progress.update(task, description=f"scoring on {summary.device}", total=summary.to_score, completed=0)

    def on_images(n: int) -> None:
        progress.advance(task, n)
        elapsed = time.monotonic() - started[0]
        if elapsed > 0:
            progress.update(task, rate=rate(progress.tasks[0].completed / elapsed, "img/s"))

    # Ctrl-C during scoring is screen's to handle (it keeps what was scored); before, nothing was done.
    interrupted = interruptible(
        "interrupted before scoring started; nothing is lost, run the same command again"
    )
    try:
        with interrupted:
            try:
                summary = screen(
                    source,
                    settings=settings,
                    bundle=bundle,
                    include=include,
                    rescore=rescore,
                    limit=limit,
                    resume=resume,
                    on_listed=on_listed,
                    on_start=on_start,
                    on_images=on_images,
                )
            finally:
                if progress.live.is_started:  # never started: an error before listing stays one line
                    progress.stop()
    except TransientError as exc:
        raise fail(f"{exc}; what was scored is kept, run the command again to resume") from None

    print_screen_summary(summary)
    if summary.interrupted:
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    failed = sum(summary.failed.values())
    if failed and not allow_failures:
        err_console.print(
            f"{failed:,} image{'s' if failed != 1 else ''} failed (reasons above): exit "
            f"{int(ExitCode.FAILURES)}; pass --allow-failures when some failures are expected",
            highlight=False,
        )
        raise typer.Exit(int(ExitCode.FAILURES))


def print_screen_summary(summary: ScreenSummary) -> None:
    """The closing report: counts, failure reasons, the top flagged images and where the results are.

    The flagged count and the top flagged are the job's, as ``jobs``, ``status`` and ``results --flagged``
    show them: on a re-run they include the images scored earlier and reused.
    """
    from producer.screen import resume_hint  # already imported by screen; kept off start-up

    interrupted = f" interrupted: {resume_hint(summary.job_id)}" if summary.interrupted else ""
    resumed = " (resumed)" if summary.resumed else ""
    flagged_now = f" ({number(summary.flagged_now)} of them scored now)" if summary.skipped else ""
    _line(
        f"[bold]Job {summary.job_id}[/]{resumed} with bundle {escape(summary.bundle_id)}{interrupted}",
        markup=True,
    )
    _line(
        f"  listed {number(summary.listed)}; already scored {number(summary.skipped)}; "
        f"scored now {number(summary.scored)}; failed {number(sum(summary.failed.values()))}; "
        f"flagged COVID-positive {number(summary.flagged)}{flagged_now}"
    )
    if summary.not_listed:
        from producer.listing import describe_not_listed  # already imported by screen; kept off start-up

        _line(f"  {describe_not_listed(summary.not_listed)}")
    if summary.failed:
        rows = [(reason, number(count)) for reason, count in summary.failed.most_common()]
        show(rows_table("Failures", ("reason", "images"), rows, right=("images",)))
    if summary.heatmaps or summary.heatmap_errors:
        _line(f"  heatmaps stored {number(summary.heatmaps)} in {summary.artifacts}")
    if summary.heatmap_errors:
        rows = [(why, number(count)) for why, count in summary.heatmap_errors.most_common()]
        show(rows_table("Heatmaps not stored (the scores stand)", ("why", "images"), rows, right=("images",)))
    flagged = summary.highest_flagged()
    if flagged:
        rows = [(score(value), uri) for value, uri in flagged]
        title = f"Top {len(flagged)} flagged"
        show(rows_table(title, ("ensemble score", "image"), rows, right=("ensemble score",)))
    if summary.promoted:
        _line(f"Bundle {summary.bundle_id} is now the active bundle (there was none).")
    _line(f"Results: {_where(summary.database_url)}")
    _line(
        f"Export:  deepcovid results {summary.job_id} --format csv --out results.csv"
        f"   (flagged only: add --flagged)"
    )


def _line(text: str, *, markup: bool = False) -> None:
    """A line of the summary, never folded by the console, so paths stay whole for copy and grep."""
    console.print(text, highlight=False, soft_wrap=True, markup=markup)


def _where(url: str) -> str:
    """Where the results are: a file path for SQLite, a masked URL otherwise."""
    if url.startswith("sqlite:///"):
        return os.path.abspath(url[len("sqlite:///") :])
    return mask_url(url)
