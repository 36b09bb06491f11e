"""Commands contributed by the `producer` package: enqueue, screen, status, results, jobs, requeue, audit."""

from __future__ import annotations

import contextlib
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from db.queries import JobProgress
    from producer.enqueue import PreflightError

console = Console()
err_console = Console(stderr=True)

EXIT_CODES_HELP = (
    "Exit codes: 0 queued or nothing to do; 2 bad usage; 3 schema not current (run `deepcovid db upgrade`); "
    "10 source path missing; 11 source unreadable; 12 S3 bucket missing; 13 S3 access denied; "
    "14 broker unreachable; 15 database unreachable; 16 no bundle; 17 source outside the storage roots; "
    "18 S3 endpoint unreachable; 130 interrupted (re-run to resume)."
)


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Attach this package's commands to the CLI (called by deepcovid.cli)."""
    app.command("enqueue", help=enqueue_command.__doc__ + "\n\n" + EXIT_CODES_HELP)(enqueue_command)
    app.command("screen", help=screen_command.__doc__ + "\n\n" + EXIT_CODES_HELP)(screen_command)
    app.command("status")(status_command)
    app.command("results")(results_command)
    app.command("jobs")(jobs_command)
    app.command("requeue")(requeue_command)
    app.command("audit")(audit_command)


def _fail(exc: PreflightError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _engine() -> Engine:
    from deepcovid.settings import get_settings
    from producer.enqueue import PreflightError, check_database

    try:
        return check_database(get_settings())
    except PreflightError as exc:
        raise _fail(exc) from None


# ----------------------------------------------------------------------------------------------------------
# enqueue


def enqueue_command(
    source: str = typer.Argument(
        ..., help="A directory (under DEEPCOVID_STORAGE_ROOTS) or s3://bucket/prefix."
    ),
    chunk_size: Optional[int] = typer.Option(
        None, "--chunk-size", min=1, help="Images per task message (default DEEPCOVID_CHUNK_SIZE)."
    ),
    include: Optional[str] = typer.Option(
        None,
        "--include",
        help="Extensions to list (png,jpg,jpeg,dcm,dicom by default); add `sniff` to also keep files whose "
        "first bytes are PNG/JPEG/DICOM (extension-less DICOM archives); `all` lists every file.",
    ),
    rescore: bool = typer.Option(False, "--rescore", help="Score again images the bundle already scored."),
    bundle: Optional[str] = typer.Option(
        None, "--bundle", help="Registered bundle id (default: the active one)."
    ),
    follow: bool = typer.Option(False, "--follow", help="Then show live progress until the job finishes."),
) -> None:
    """Queue every image of SOURCE for scoring by the workers, as one job. Re-running resumes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from producer.enqueue import EnqueueSummary, PreflightError, enqueue

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("checking", total=None)

        def report(summary: EnqueueSummary) -> None:
            progress.update(
                task,
                description=f"job {summary.job_id}: listed {summary.listed:,}, queued {summary.queued:,}, "
                f"skipped {summary.skipped:,}",
            )

        try:
            summary = enqueue(
                source,
                bundle_id=bundle,
                chunk_size=chunk_size,
                include=include,
                rescore=rescore,
                on_progress=report,
            )
        except PreflightError as exc:
            raise _fail(exc) from None
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: what was queued stays queued; run the same command again to resume"
            )
            raise typer.Exit(130) from None

    for path in summary.unreadable[:10]:
        err_console.print(f"[yellow]warning:[/] skipped unreadable directory {path}", highlight=False)
    if len(summary.unreadable) > 10:
        err_console.print(
            f"[yellow]warning:[/] ... and {len(summary.unreadable) - 10} more unreadable directories"
        )
    if summary.queued == 0:
        what = "no images found" if summary.listed == 0 else f"all {summary.listed:,} images already scored"
        console.print(
            f"Nothing to do: {what} with bundle {summary.bundle_id} (job {summary.job_id})."
            + (" Use --rescore to score them again." if summary.listed else ""),
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
        follow_job(_engine(), summary.job_id)
    else:
        console.print(f"Follow it with: deepcovid status {summary.job_id} --follow", highlight=False)


# ----------------------------------------------------------------------------------------------------------
# screen


def screen_command(
    source: str = typer.Argument(..., help="A directory of images (or s3://bucket/prefix)."),
    bundle: Optional[str] = typer.Option(
        None,
        "--bundle",
        help="A bundle directory (verified, installed, registered) or a registered bundle id.",
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    include: Optional[str] = typer.Option(
        None, "--include", help="Extensions to list, plus `sniff` for extension-less files, or `all`."
    ),
    rescore: bool = typer.Option(False, "--rescore", help="Score again images the bundle already scored."),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="Screen only the first N images listed."
    ),
) -> None:
    """Screen SOURCE in this process: no broker, no database server (SQLite in DEEPCOVID_DATA_DIR).

    Same listing, scoring and storage as enqueue + workers. Ctrl-C keeps what was scored; re-running resumes.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from deepcovid.errors import TransientError
    from deepcovid.settings import get_settings
    from producer.enqueue import PreflightError
    from producer.screen import ScreenSummary, screen

    settings = get_settings()
    updates: dict[str, Any] = {}
    if batch_size:
        updates["batch_size"] = batch_size
    if device:
        updates["device"] = device
    if updates:
        settings = settings.model_copy(update=updates)

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
        progress.update(
            task, description=f"listing ({summary.listed:,} found, {summary.to_score:,} to score)"
        )

    def on_start(summary: ScreenSummary) -> None:
        started[0] = time.monotonic()
        progress.update(task, description=f"scoring on {summary.device}", total=summary.to_score, completed=0)

    def on_images(n: int) -> None:
        progress.advance(task, n)
        done = progress.tasks[0].completed
        elapsed = time.monotonic() - started[0]
        if elapsed > 0:
            progress.update(task, rate=f"{done / elapsed:,.1f} img/s")

    try:
        with progress:
            summary = screen(
                source,
                settings=settings,
                bundle=bundle,
                include=include,
                rescore=rescore,
                limit=limit,
                on_listed=on_listed,
                on_start=on_start,
                on_images=on_images,
            )
    except PreflightError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err_console.print("interrupted before scoring started; nothing is lost, run the same command again")
        raise typer.Exit(130) from None
    except TransientError as exc:
        err_console.print(
            f"[bold red]error:[/] {exc}; what was scored is kept, run the command again to resume"
        )
        raise typer.Exit(1) from None

    print_screen_summary(summary)
    if summary.interrupted:
        raise typer.Exit(130)


def print_screen_summary(summary: Any) -> None:
    """The closing report: counts, failure reasons, the top flagged images and where the results are."""
    from rich.table import Table

    from producer.screen import display_database, top_flagged

    elapsed_note = " (interrupted: run the same command again to resume)" if summary.interrupted else ""
    console.print(
        f"[bold]Job {summary.job_id}[/] with bundle {summary.bundle_id}{elapsed_note}\n"
        f"  listed {summary.listed:,}; already scored {summary.skipped:,}; "
        f"scored now {summary.scored:,}; failed {sum(summary.failed.values()):,}; "
        f"flagged COVID-positive {summary.flagged:,}",
        highlight=False,
    )
    if summary.failed:
        table = Table("reason", "images", title="Failures")
        for reason, count in summary.failed.most_common():
            table.add_row(reason, f"{count:,}")
        console.print(table)
    flagged = top_flagged(summary)
    if flagged:
        table = Table("ensemble score", "image", title=f"Top {len(flagged)} flagged")
        for score, uri in flagged:
            table.add_row(f"{score:.3f}", uri)
        console.print(table)
    if summary.promoted:
        console.print(
            f"Bundle {summary.bundle_id} is now the active bundle (there was none).", highlight=False
        )
    console.print(f"Results: {display_database(summary.database_url)}", highlight=False)
    console.print(
        f"Export:  deepcovid results {summary.job_id} --format csv --out results.csv"
        f"   (flagged only: add --flagged)",
        highlight=False,
    )


# ----------------------------------------------------------------------------------------------------------
# status / jobs / results / requeue / audit


def _job_or_exit(engine: Engine, job_id: int) -> JobProgress:
    from db.queries import UnknownJob, job_progress

    try:
        return job_progress(engine, job_id)
    except UnknownJob:
        err_console.print(f"[bold red]error:[/] no job {job_id} (see `deepcovid jobs`)")
        raise typer.Exit(1) from None


def status_command(
    job: int = typer.Argument(..., help="Job id (from `deepcovid enqueue` or `deepcovid jobs`)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Live progress bar until the job finishes."),
) -> None:
    """Show a job's progress: scored, failed and queued images, rate and ETA (from the database)."""
    engine = _engine()
    progress = _job_or_exit(engine, job)
    if follow:
        follow_job(engine, job)
    else:
        print_progress(progress)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def follow_job(engine: Engine, job_id: int, interval: float = 1.0) -> None:
    """A live progress bar fed by the database until the job finishes (Ctrl-C stops watching, not the job)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    current = _job_or_exit(engine, job_id)
    progress = Progress(
        TextColumn(f"job {job_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    task = progress.add_task("", total=current.total, completed=current.done, counts="", rate="", eta="-")
    try:
        with progress:
            while True:
                progress.update(
                    task,
                    total=current.total,
                    completed=current.done,
                    counts=_counts_text(current),
                    rate=f"{current.rate_per_s:,.1f} img/s",
                    eta=_duration(current.eta_s),
                )
                if current.state.value != "running":
                    break
                time.sleep(interval)
                current = _job_or_exit(engine, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped watching; the job goes on. Resume with: deepcovid status {job_id} --follow")
        raise typer.Exit(130) from None
    print_progress(current)


def _counts_text(progress: JobProgress) -> str:
    return (
        f"scored {progress.scored:,}  failed {progress.failed:,}  queued {progress.queued:,}  "
        f"flagged {progress.flagged:,}"
    )


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else ""


def print_progress(progress: JobProgress) -> None:
    """One job's counts as a small table."""
    from rich.table import Table

    table = Table(show_header=False, title=f"Job {progress.job_id}")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", progress.source)
    table.add_row("bundle", progress.bundle_id)
    table.add_row("state", progress.state.value)
    table.add_row("total", f"{progress.total:,}")
    table.add_row("scored", f"{progress.scored:,}")
    table.add_row("failed", f"{progress.failed:,}")
    for reason, count in progress.failed_by_reason.items():
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("queued", f"{progress.queued:,}")
    if progress.skipped:
        table.add_row("skipped", f"{progress.skipped:,}")
    table.add_row("flagged", f"{progress.flagged:,}")
    if progress.state.value == "running":
        table.add_row("rate", f"{progress.rate_per_s:,.1f} images/s")
        table.add_row("ETA", _duration(progress.eta_s))
    table.add_row("created", _when(progress.created_at))
    if progress.finished_at is not None:
        table.add_row("finished", _when(progress.finished_at))
    console.print(table)


def jobs_command(limit: int = typer.Option(20, "--limit", min=1, help="How many recent jobs.")) -> None:
    """List recent jobs, newest first, with their counts."""
    from rich.table import Table

    from db.queries import list_jobs

    engine = _engine()
    table = Table("job", "state", "bundle", "source", "total", "scored", "failed", "queued", "flagged")
    table.add_column("created")
    for job in list_jobs(engine, limit=limit):
        table.add_row(
            str(job.job_id),
            job.state.value,
            job.bundle_id,
            job.source,
            *(f"{n:,}" for n in (job.total, job.scored, job.failed, job.queued, job.flagged)),
            f"{job.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


def results_command(
    job: int = typer.Argument(..., help="Job id."),
    flagged: bool = typer.Option(False, "--flagged", help="Only images the ensemble flagged COVID-positive."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table (terminal), csv or jsonl."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this file instead of standard output."),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="At most N rows (the table shows 50 unless told)."
    ),
) -> None:
    """Show or export a job's results; csv and jsonl stream, so a job of any size can be exported."""
    engine = _engine()
    _job_or_exit(engine, job)
    if fmt is OutputFormat.table:
        _results_table(engine, job, flagged=flagged, limit=limit or 50, out=out)
        return
    if out is None:
        _export(engine, job, sys.stdout, fmt.value, flagged, limit)
        return
    with open(out, "w", encoding="utf-8", newline="") as fh:
        count = _export(engine, job, fh, fmt.value, flagged, limit)
    err_console.print(f"wrote {count:,} rows to {out}", highlight=False)


def _export(engine: Engine, job: int, out: Any, fmt: str, flagged: bool, limit: Optional[int]) -> int:
    from db.queries import export_results

    if limit is None:
        return export_results(engine, job, out, fmt=fmt, flagged_only=flagged)
    # export_results has no row limit: let it write into a buffer that stops after the header + N rows.
    limited = _LineLimit(out, limit + (1 if fmt == "csv" else 0))
    with contextlib.suppress(_LineLimit.Reached):
        export_results(engine, job, limited, fmt=fmt, flagged_only=flagged)
    return limit if fmt != "csv" else max(limited.lines - 1, 0)


class _LineLimit:
    """A text sink that passes through at most ``max_lines`` lines, then stops the writer."""

    class Reached(Exception):
        pass

    def __init__(self, out: Any, max_lines: int) -> None:
        self.out = out
        self.max_lines = max_lines
        self.lines = 0

    def write(self, text: str) -> int:
        if self.lines >= self.max_lines:
            raise _LineLimit.Reached
        self.out.write(text)
        self.lines += text.count("\n")
        return len(text)


def _results_table(engine: Engine, job: int, *, flagged: bool, limit: int, out: Optional[Path]) -> None:
    from itertools import islice

    from rich.table import Table

    from db.queries import iter_results

    table = Table("image", "status", "ensemble", "flagged", "disagreement", "failure", title=f"Job {job}")
    shown = 0
    rows = iter_results(engine, job, flagged_only=flagged)
    try:
        for row in islice(rows, limit):
            score = row["ensemble_score"]
            decision = row["ensemble_decision"]
            disagreement = row["disagreement"]
            table.add_row(
                row["uri"],
                row["status"],
                f"{score:.3f}" if score is not None else "",
                "" if decision is None else ("yes" if decision else "no"),
                f"{disagreement:.3f}" if disagreement is not None else "",
                row["reason"] or "",
            )
            shown += 1
    finally:
        rows.close()  # releases the streaming cursor's connection
    if out is None:
        console.print(table)
    else:
        with open(out, "w", encoding="utf-8") as fh:
            Console(file=fh, width=200).print(table)
    if shown == limit:
        err_console.print(
            f"showing the first {limit} rows; export them all with "
            f"`deepcovid results {job} --format csv --out results.csv`",
            highlight=False,
        )


def requeue_command(
    job: int = typer.Argument(..., help="Job id."),
    failed: bool = typer.Option(False, "--failed", help="Re-queue the job's failed images."),
    queued: bool = typer.Option(
        False,
        "--queued",
        help="Re-send images still queued (a job stuck after a broker crash or exhausted retries). "
        "Safe: results are written once per image and bundle.",
    ),
    reason: Optional[str] = typer.Option(None, "--reason", help="Only images that failed with this reason."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Images per task message."),
) -> None:
    """Send a job's failed (or stuck queued) images back to the workers, e.g. after fixing storage."""
    from db.jobs import requeue_failed
    from db.queries import queued_uris
    from deepcovid.errors import REASONS
    from deepcovid.queue import make_celery, send_chunk
    from deepcovid.settings import get_settings
    from producer.enqueue import PreflightError, batched, check_broker

    if not (failed or queued):
        err_console.print("[bold red]error:[/] say what to requeue: --failed and/or --queued")
        raise typer.Exit(2)
    if reason is not None and reason not in REASONS:
        err_console.print(f"[bold red]error:[/] unknown reason {reason!r}; one of {', '.join(REASONS)}")
        raise typer.Exit(2)
    settings = get_settings()
    engine = _engine()
    progress = _job_or_exit(engine, job)
    app = make_celery(settings)
    try:
        check_broker(app)
    except PreflightError as exc:
        raise _fail(exc) from None
    uris = queued_uris(engine, job) if queued else []
    if failed:
        uris += requeue_failed(engine, job, reason=reason)
    chunks = 0
    for chunk in batched(uris, chunk_size or settings.chunk_size):
        send_chunk(app, job, progress.bundle_id, chunk)
        chunks += 1
    what = " and ".join(name for name, on in (("queued", queued), ("failed", failed)) if on)
    console.print(f"Job {job}: re-queued {len(uris):,} {what} images in {chunks} chunks.", highlight=False)


def audit_command(
    uri: str = typer.Argument(..., help="An image URI (absolute path or s3://bucket/key)."),
) -> None:
    """Show an image's audit trail: its state, failures, and every bundle that scored it (when, where)."""
    from dataclasses import asdict

    from db.queries import image_audit

    engine = _engine()
    trail = image_audit(engine, uri)
    if trail is None:
        err_console.print(f"[bold red]error:[/] {uri} is not in the database", highlight=False)
        raise typer.Exit(1)
    console.print_json(data=asdict(trail), default=str)
