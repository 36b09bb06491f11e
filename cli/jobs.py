"""Commands on scan jobs once they exist: ``status``, ``jobs``, ``results``, ``requeue`` and ``audit``."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from datetime import datetime
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.render import console, err_console, fail, number, record_table, rows_table, save, score
from deepcovid import defaults
from deepcovid.exitcodes import ExitCode
from deepcovid.status import JobStatus

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from db.queries import JobProgress


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"


def database() -> Engine:
    """The results database, reachable and migrated (a UserError says what to do otherwise)."""
    from db.schema import open_database  # SQLAlchemy and Alembic: kept out of CLI start-up

    return open_database()


def _job(engine: Engine, job_id: int) -> JobProgress:
    from producer.requeue import find_job  # SQLAlchemy and Celery: kept out of CLI start-up

    return find_job(engine, job_id)


# ----------------------------------------------------------------------------------------------------------
# status


def status_command(
    job: int = typer.Argument(..., help="Job id (from `deepcovid enqueue` or `deepcovid jobs`)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Live progress bar until the job finishes."),
) -> None:
    """Show a job's progress: scored, failed and queued images, rate and ETA (from the database)."""
    engine = database()
    progress = _job(engine, job)
    if follow:
        follow_job(engine, job)
    else:
        print_progress(progress)


def follow_job(engine: Engine, job_id: int, interval: float = 1.0) -> None:
    """A live progress bar fed by the database until the job finishes (Ctrl-C stops watching, not the job)."""
    current = _job(engine, job_id)
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
                    counts=_counts(current),
                    rate=f"{current.rate_per_s:,.1f} img/s",
                    eta=_duration(current.eta_s),
                )
                if current.state is not JobStatus.running:
                    break
                time.sleep(interval)
                current = _job(engine, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped watching; the job goes on. Resume with: deepcovid status {job_id} --follow")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    print_progress(current)


def print_progress(progress: JobProgress) -> None:
    """One job's counts as a small table."""
    rows = [
        ("source", progress.source),
        ("bundle", progress.bundle_id),
        ("state", progress.state.value),
        ("total", number(progress.total)),
        ("scored", number(progress.scored)),
        ("failed", number(progress.failed)),
        *((f"  {reason}", number(count)) for reason, count in progress.failed_by_reason.items()),
        ("queued", number(progress.queued)),
    ]
    if progress.skipped:
        rows.append(("skipped", number(progress.skipped)))
    rows.append(("flagged", number(progress.flagged)))
    if progress.state is JobStatus.running:
        rows.append(("rate", f"{progress.rate_per_s:,.1f} images/s"))
        rows.append(("ETA", _duration(progress.eta_s)))
    rows.append(("created", _when(progress.created_at)))
    if progress.finished_at is not None:
        rows.append(("finished", _when(progress.finished_at)))
    console.print(record_table(f"Job {progress.job_id}", rows))


def _counts(progress: JobProgress) -> str:
    return (
        f"scored {progress.scored:,}  failed {progress.failed:,}  queued {progress.queued:,}  "
        f"flagged {progress.flagged:,}"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else ""


# ----------------------------------------------------------------------------------------------------------
# jobs


def jobs_command(
    limit: int = typer.Option(defaults.JOBS_LISTED, "--limit", min=1, help="How many recent jobs."),
) -> None:
    """List recent jobs, newest first, with their counts."""
    from db.queries import list_jobs  # SQLAlchemy: kept out of CLI start-up

    columns = (
        "job",
        "state",
        "bundle",
        "source",
        "total",
        "scored",
        "failed",
        "queued",
        "flagged",
        "created",
    )
    rows = [
        (
            str(job.job_id),
            job.state.value,
            job.bundle_id,
            job.source,
            *(number(n) for n in (job.total, job.scored, job.failed, job.queued, job.flagged)),
            f"{job.created_at:%Y-%m-%d %H:%M}",
        )
        for job in list_jobs(database(), limit=limit)
    ]
    console.print(rows_table(None, columns, rows))


# ----------------------------------------------------------------------------------------------------------
# results


def results_command(
    job: int = typer.Argument(..., help="Job id."),
    flagged: bool = typer.Option(False, "--flagged", help="Only images the ensemble flagged COVID-positive."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table (terminal), csv or jsonl."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this file instead of standard output."),
    limit: Optional[int] = typer.Option(
        None,
        "--limit",
        min=1,
        help=f"At most N rows (the table shows {defaults.RESULTS_TABLE_ROWS} unless told).",
    ),
) -> None:
    """Show or export a job's results; csv and jsonl stream, so a job of any size can be exported."""
    from db.queries import export_results  # SQLAlchemy: kept out of CLI start-up

    engine = database()
    _job(engine, job)
    if fmt is OutputFormat.table:
        _results_table(engine, job, flagged=flagged, limit=limit or defaults.RESULTS_TABLE_ROWS, out=out)
        return
    if out is None:
        export_results(engine, job, sys.stdout, fmt=fmt.value, flagged_only=flagged, limit=limit)
        return
    with open(out, "w", encoding="utf-8", newline="") as fh:
        count = export_results(engine, job, fh, fmt=fmt.value, flagged_only=flagged, limit=limit)
    err_console.print(f"wrote {count:,} rows to {out}", highlight=False)


def _results_table(engine: Engine, job: int, *, flagged: bool, limit: int, out: Path | None) -> None:
    from db.queries import iter_results  # SQLAlchemy: kept out of CLI start-up

    rows = iter_results(engine, job, flagged_only=flagged)
    try:
        shown = [
            (
                row["uri"],
                row["status"],
                score(row["ensemble_score"]),
                "" if row["ensemble_decision"] is None else ("yes" if row["ensemble_decision"] else "no"),
                score(row["disagreement"]),
                row["reason"] or "",
            )
            for row in islice(rows, limit)
        ]
    finally:
        rows.close()  # releases the streaming cursor's connection
    table = rows_table(
        f"Job {job}", ("image", "status", "ensemble", "flagged", "disagreement", "failure"), shown
    )
    if out is None:
        console.print(table)
    else:
        save(table, out)
    if len(shown) == limit:
        err_console.print(
            f"showing the first {limit} rows; export them all with "
            f"`deepcovid results {job} --format csv --out results.csv`",
            highlight=False,
        )


# ----------------------------------------------------------------------------------------------------------
# requeue / audit


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
    from producer.requeue import requeue  # SQLAlchemy and Celery: kept out of CLI start-up

    if not (failed or queued):
        raise fail("say what to requeue: --failed and/or --queued", ExitCode.USAGE)
    summary = requeue(job, failed=failed, queued=queued, reason=reason, chunk_size=chunk_size)
    what = " and ".join(name for name, on in (("queued", queued), ("failed", failed)) if on)
    console.print(
        f"Job {job}: re-queued {summary.images:,} {what} images in {summary.chunks} chunks.", highlight=False
    )


def audit_command(
    uri: str = typer.Argument(..., help="An image URI (absolute path or s3://bucket/key)."),
) -> None:
    """Show an image's audit trail: its state, failures, and every bundle that scored it (when, where)."""
    from db.queries import image_audit  # SQLAlchemy: kept out of CLI start-up

    trail = image_audit(database(), uri)
    if trail is None:
        raise fail(f"{uri} is not in the database")
    console.print_json(data=asdict(trail), default=str)
