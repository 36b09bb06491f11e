"""Commands on scan jobs once they exist: ``status``, ``jobs``, ``results``, ``requeue`` and ``audit``."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.render import (
    check_output,
    console,
    duration,
    err_console,
    fail,
    human,
    number,
    rate,
    record_table,
    rows_table,
    save,
    score,
    show,
)
from deepcovid import defaults
from deepcovid.exitcodes import ExitCode, help_text
from deepcovid.settings import get_settings
from deepcovid.status import ImageStatus, JobStatus

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from db.queries import JobProgress


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"
    dicom_sr = "dicom-sr"


class ListFormat(str, Enum):
    table = "table"
    json = "json"


def database(*, write: bool = False) -> Engine:
    """The results database, reachable and migrated (a UserError says what to do otherwise); ``write``
    for a command that changes it, so a read-only data dir is refused in one line."""
    from db.schema import open_database  # SQLAlchemy and Alembic: kept out of CLI start-up

    return open_database(write=write)


def _job(engine: Engine, job_id: int) -> JobProgress:
    from producer.requeue import find_job  # SQLAlchemy and Celery: kept out of CLI start-up

    return find_job(engine, job_id, stall_after=get_settings().effective_stall_after)


# ----------------------------------------------------------------------------------------------------------
# status


def status_command(
    job: int = typer.Argument(..., help="Job id (from `deepcovid enqueue` or `deepcovid jobs`)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Live progress bar until the job finishes."),
    check: bool = typer.Option(
        False,
        "--check",
        help="One line, and an exit code for cron or Nagios: "
        + help_text((ExitCode.OK, ExitCode.FAILURES, ExitCode.STALLED)),
    ),
    fmt: ListFormat = typer.Option(
        ListFormat.table, "--format", help="table (terminal) or json (the fields of `jobs --format json`)."
    ),
) -> None:
    """Show a job's progress: scored, failed and queued images, rate and ETA (from the database).

    A running job with queued images and no progress for DEEPCOVID_STALL_AFTER seconds is flagged stalled.
    """
    if fmt is ListFormat.json and (check or follow):
        raise fail("--format json takes no --check or --follow", ExitCode.USAGE)
    engine = database()
    progress = _job(engine, job)
    if fmt is ListFormat.json:
        console.print_json(data=job_record(progress))
        return
    if check:
        line, code = check_line(progress)
        console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit(int(code))
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
                    rate=rate(current.rate_per_s, "img/s"),
                    eta=duration(current.eta_s),
                )
                if current.state is not JobStatus.running:
                    break
                time.sleep(interval)
                current = _job(engine, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped watching; the job goes on. Resume with: deepcovid status {job_id} --follow")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    print_progress(current)


def check_line(progress: JobProgress) -> tuple[str, ExitCode]:
    """``status --check``: one line and its exit code (stalled, finished with failed images, or OK)."""
    head = f"job {progress.job_id}"
    if progress.stalled:
        return (
            f"{head} stalled: {progress.queued:,} images queued, no progress for "
            f"{duration(_idle_s(progress))}; recover with: {_recovery(progress)}",
            ExitCode.STALLED,
        )
    counts = f"{progress.scored:,} scored, {progress.failed:,} failed, {progress.queued:,} queued"
    if progress.state is JobStatus.finished and progress.failed:
        return f"{head} finished with failed images: {counts}", ExitCode.FAILURES
    return f"{head} {progress.state.value}: {counts}", ExitCode.OK


def _idle_s(progress: JobProgress) -> float | None:
    if progress.last_progress_at is None:
        return None
    return (datetime.now(timezone.utc) - progress.last_progress_at).total_seconds()


def _recovery(progress: JobProgress) -> str:
    return f"deepcovid requeue {progress.job_id} --queued"


def _state(progress: JobProgress) -> str:
    return f"{progress.state.value} (stalled)" if progress.stalled else progress.state.value


def _bundle(progress: JobProgress) -> str:
    """The job's bundle id, marked when it was untrained (``bundle init``): its scores mean nothing."""
    return f"{progress.bundle_id} (UNTRAINED)" if progress.options.get("untrained") else progress.bundle_id


def print_progress(progress: JobProgress) -> None:
    """One job's counts as a small table."""
    rows = [
        ("source", progress.source),
        ("bundle", _bundle(progress)),
        ("state", _state(progress)),
        ("total", number(progress.total)),
        ("scored", number(progress.scored)),
        ("failed", number(progress.failed)),
        *((f"  {reason}", number(count)) for reason, count in progress.failed_by_reason.items()),
        ("queued", number(progress.queued)),
    ]
    if progress.cancelled:
        rows.append(("cancelled", number(progress.cancelled)))
    if progress.reused:
        rows.append(("reused", f"{number(progress.reused)} scored by an earlier job"))
    rows.append(("flagged", number(progress.flagged)))
    if progress.detail:
        rows.append(("why", progress.detail))
    if progress.rate_per_s is not None:
        rows.append(("rate", rate(progress.rate_per_s)))
        rows.append(("ETA", duration(progress.eta_s)))
        rows.append(("last progress", _when(progress.last_progress_at)))
    if progress.stalled:
        rows.append(("stalled", f"no progress for {duration(_idle_s(progress))}"))
        rows.append(("recover", _recovery(progress)))
    rows.append(("created", _when(progress.created_at)))
    if progress.finished_at is not None:
        rows.append(("finished", _when(progress.finished_at)))
    show(record_table(f"Job {progress.job_id}", rows))


def _counts(progress: JobProgress) -> str:
    return (
        f"scored {progress.scored:,}  failed {progress.failed:,}  queued {progress.queued:,}  "
        f"flagged {progress.flagged:,}"
    )


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else ""


# ----------------------------------------------------------------------------------------------------------
# jobs


def jobs_command(
    ctx: typer.Context,
    limit: int = typer.Option(defaults.JOBS_LISTED, "--limit", min=1, help="How many recent jobs."),
    fmt: ListFormat = typer.Option(ListFormat.table, "--format", help="table (terminal) or json."),
) -> None:
    """List recent jobs, newest first, with their counts; a stalled job shows as ``running (stalled)``.

    The table leaves out each job's bundle and total (``status JOB`` shows them) to fit 80 columns; json
    has every field. `jobs close JOB` ends an abandoned job; `jobs prune --before DATE` removes history.
    """
    if ctx.invoked_subcommand is not None:
        return
    from db.queries import list_jobs  # SQLAlchemy: kept out of CLI start-up

    jobs = list_jobs(database(), limit=limit, stall_after=get_settings().effective_stall_after)
    if fmt is ListFormat.json:
        console.print_json(data=[job_record(job) for job in jobs])
        return
    counts = ("scored", "failed", "queued", "flagged")
    rows = [
        (
            str(job.job_id),
            _state(job) + (" (UNTRAINED)" if job.options.get("untrained") else ""),
            *(number(getattr(job, name)) for name in counts),
            f"{job.created_at:%Y-%m-%d %H:%M}",
            job.source,
        )
        for job in jobs
    ]
    show(rows_table(None, ("job", "state", *counts, "created", "source"), rows, right=("job", *counts)))


def job_record(job: JobProgress) -> dict[str, object]:
    """One job for scripts (``jobs`` and ``status --format json``): full precision, ISO 8601 times."""
    return {
        "job": job.job_id,
        "state": job.state.value,
        "stalled": job.stalled,
        "bundle": job.bundle_id,
        "untrained": bool(job.options.get("untrained")),
        "source": job.source,
        "total": job.total,
        **{state.value: job.counts.get(state.value, 0) for state in ImageStatus},
        "failed_by_reason": dict(job.failed_by_reason),
        "flagged": job.flagged,
        "reused": job.reused,
        "detail": job.detail,
        "rate_per_s": job.rate_per_s,
        "eta_s": job.eta_s,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "last_progress_at": job.last_progress_at.isoformat() if job.last_progress_at else None,
    }


def close_command(job: int = typer.Argument(..., help="Job id.")) -> None:
    """End an abandoned job: its images still queued are recorded as cancelled; what was scored stays."""
    from db.jobs import close_job  # SQLAlchemy: kept out of CLI start-up

    engine = database(write=True)
    progress = _job(engine, job)
    if progress.state is JobStatus.running and not progress.stalled and progress.runner:
        raise fail(f"job {job} is being screened by {progress.runner}; stop that run first", ExitCode.USAGE)
    cancelled = close_job(engine, job)
    state = _job(engine, job).state.value
    console.print(f"Job {job} is {state}: {number(cancelled)} queued images cancelled.", highlight=False)


def prune_command(
    before: datetime = typer.Option(
        ...,
        "--before",
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"],
        help="Remove jobs created before this date (local time), e.g. 2026-01-01.",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove old jobs for good, with the predictions and images no remaining job refers to.

    Running jobs are kept. This is the only command that removes history.
    """
    from db.jobs import prune_jobs  # SQLAlchemy: kept out of CLI start-up

    engine = database(write=True)
    cutoff = before.astimezone()  # a date without a zone is local time
    planned = prune_jobs(engine, cutoff, dry_run=True)
    if not planned.jobs:
        console.print(f"no finished jobs created before {cutoff:%Y-%m-%d %H:%M}; nothing removed")
        return
    if not yes and not typer.confirm(
        f"Remove {planned.jobs:,} jobs created before {cutoff:%Y-%m-%d %H:%M} and their results?", err=True
    ):
        raise fail("not confirmed: nothing changed (pass --yes to skip the question)", ExitCode.USAGE)
    done = prune_jobs(engine, cutoff)
    console.print(
        f"Removed {number(done.jobs)} jobs, {number(done.predictions)} predictions and "
        f"{number(done.images)} images no remaining job refers to.",
        highlight=False,
    )


# ----------------------------------------------------------------------------------------------------------
# results


def results_command(
    job: int = typer.Argument(..., help="Job id."),
    flagged: bool = typer.Option(False, "--flagged", help="Only images the ensemble flagged COVID-positive."),
    fmt: OutputFormat = typer.Option(
        OutputFormat.table,
        "--format",
        help="table (terminal), csv, jsonl, or dicom-sr (one DICOM SR report per scored image, into the "
        "--out folder).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write to this file instead of standard output (dicom-sr: this folder)."
    ),
    limit: Optional[int] = typer.Option(
        None,
        "--limit",
        min=1,
        help=f"At most N rows (the table shows {defaults.RESULTS_TABLE_ROWS} unless told).",
    ),
) -> None:
    """Show or export a job's results; csv and jsonl stream, so a job of any size can be exported."""
    from db.queries import export_results  # SQLAlchemy: kept out of CLI start-up

    if fmt is OutputFormat.dicom_sr:
        from cli.pacs import write_reports_command  # highdicom: only for DICOM SR reports

        write_reports_command(job, out)
        return
    check_output(out)
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
                row["status"] + (" (reused)" if row["reused"] else ""),
                score(row["ensemble_score"]),
                human(row["ensemble_decision"]),
                score(row["disagreement"]),
                row["reason"] or "",
                row["uri"],
            )
            for row in islice(rows, limit)
        ]
    finally:
        rows.close()  # releases the streaming cursor's connection
    columns = ("status", "ensemble", "flagged", "disagreement", "failure", "image")
    table = rows_table(f"Job {job}", columns, shown, right=("ensemble", "disagreement"))
    if out is None:
        show(table)
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
    job: Optional[int] = typer.Argument(None, help="Job id (not with --stalled)."),
    failed: bool = typer.Option(False, "--failed", help="Re-queue the job's failed images."),
    queued: bool = typer.Option(
        False,
        "--queued",
        help="Re-send images still queued (a job stuck after a broker crash or exhausted retries). "
        "Safe: results are written once per image and bundle.",
    ),
    stalled: bool = typer.Option(
        False,
        "--stalled",
        help="Re-send the queued images of every stalled job (no JOB; fit for cron). "
        "Re-sending restarts a job's stall window, so a job is not re-sent twice within it.",
    ),
    reason: Optional[str] = typer.Option(None, "--reason", help="Only images that failed with this reason."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Images per task message."),
) -> None:
    """Send a job's failed (or stuck queued) images back to the workers, e.g. after fixing storage."""
    from producer.requeue import requeue, requeue_stalled  # SQLAlchemy and Celery: kept out of CLI start-up

    if stalled:
        if job is not None or failed or queued or reason:
            raise fail("--stalled takes no JOB, --failed, --queued or --reason", ExitCode.USAGE)
        summaries = requeue_stalled(chunk_size=chunk_size)
        if not summaries:
            console.print("no stalled jobs", highlight=False)
        for done in summaries:
            console.print(
                f"Job {done.job_id}: re-queued {done.images:,} queued images in {done.chunks} chunks.",
                highlight=False,
            )
        return
    if job is None:
        raise fail("say which job: deepcovid requeue JOB --failed/--queued (or --stalled)", ExitCode.USAGE)
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
